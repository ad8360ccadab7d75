"""The regularized model through the real config: batch norm, dropout, embedding L2, dense weight decay, the
plateau decay and the AUC − logloss monitor, compressed by UMEC joint and rebuilt from compressed.pt."""

import pytest
import torch

from umec_lightning import load_compressed
from umec_lightning.compression.export import random_inputs
from umec_lightning.config import ConfigError
from umec_lightning.models import fold_batch_norm
from umec_lightning.run import run

from .conftest import compose_cfg

REGULARIZED = ["model.top=[32,16,1]", "model.batch_norm=true", "model.dropout=0.2",
               "regularization.embedding_l2=0.0001", "regularization.dense_l2=0.00001",
               "phases.lr_decay.factor=0.5", "eval.monitor=auc_logloss", "loader.limit_rows={train:8000}"]


def test_joint_compresses_the_regularized_model_and_keeps_its_norms(tmp_path, cache_dir):
    cfg = compose_cfg([*REGULARIZED, "mode=joint", "budget.flops=0.3", "phases.finetune_epochs=1"], cache_dir)
    summary = run(cfg, tmp_path)
    assert summary["budget_met"] and summary["flops_ratio"] <= 0.3
    assert summary["quality_collapse"] is False and "delta_test_logloss" in summary
    assert summary["test_auc"] > 0.6
    assert "lr_decays" in summary["pretrain"] and "lr_decays" in summary["stages"]["finetune"]
    neurons = summary["kept"]["neurons"]
    model = load_compressed(tmp_path / "compressed.pt")
    assert model.structure.batch_norm == ["dense.layers.0", "over.layers.0", "over.layers.1"]
    norms = model.batch_norms()
    assert {name: norm.num_features for name, norm in norms.items()} == {name: neurons[name] for name in norms}
    dense = summary["kept"]["dense_neurons"]
    assert any(neurons[name] < dense[name] for name in norms)  # batch-normalised neurons were pruned
    assert set(model.structure.dropout) == set(model.structure.batch_norm)
    inputs = random_inputs(model.structure, 64)
    served = fold_batch_norm(model)
    torch.testing.assert_close(served(*inputs), model.eval()(*inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("override, key", [
    ("+regularization.embedding_l1=0.1", "regularization"),
    ("regularization.embedding_rows=some", "regularization.embedding_rows"),
    ("eval.monitor=accuracy", "eval.monitor"),
    ("phases.lr_decay.factor=2", "phases.lr_decay.factor"),
    ("model.dropout=1.5", "model.dropout"),
    ("model.batch_norm={over.layers.1:true}", "model.batch_norm"),
    ("eval.collapse_threshold=0", "eval.collapse_threshold"),
])
def test_bad_regularization_config_names_its_key(tmp_path, cache_dir, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run(compose_cfg([override], cache_dir), tmp_path)


def test_dense_l2_and_optimizer_weight_decay_are_not_both_set(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match="set one"):
        run(compose_cfg(["regularization.dense_l2=0.01", "optim.weight_decay=0.01"], cache_dir), tmp_path)
