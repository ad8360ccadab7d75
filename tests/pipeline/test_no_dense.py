"""A DLRM over categorical features alone (Avazu, Frappe, MovieLens have no dense feature): the stock model
configs train it, and every compression mode compresses it (no bottom MLP, the interaction over the
embeddings). The data is a real CSV through `TabularCSV` with `dense: []`."""

from __future__ import annotations

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from umec_lightning.compressed import load_compressed
from umec_lightning.models import measure
from umec_lightning.run import run

from .conftest import CONF

FEATURES = [f"f{i}" for i in range(6)]


@pytest.fixture(scope="module")
def csv_path(tmp_path_factory):
    """16000 rows; f0 and f1 carry the signal (a main effect each and their interaction), f2..f5 are noise."""
    rng = np.random.default_rng(0)
    n = 16000
    cards = [20, 30, 10, 50, 8, 40]
    ids = np.stack([rng.integers(0, c, n) for c in cards], 1)
    effect0, effect1 = rng.normal(0, 1.2, cards[0]), rng.normal(0, 1.2, cards[1])
    logit = effect0[ids[:, 0]] + effect1[ids[:, 1]] + 0.8 * np.sign(effect0[ids[:, 0]] * effect1[ids[:, 1]]) - 1.0
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    path = tmp_path_factory.mktemp("nodense") / "clicks.csv"
    lines = [",".join(["clicked", *FEATURES])]
    lines += [",".join([str(y), *(f"v{v}" for v in row)]) for y, row in zip(label, ids)]
    path.write_text("\n".join(lines) + "\n")
    return path


def compose_no_dense(csv_path, cache_dir, overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[
            "data=tabular_example", f"data.path={csv_path}", "data.label=clicked", "data.dense=[]",
            f"data.categorical=[{','.join(FEATURES)}]", "data.split=[0.8,0.1,0.1]", "data.name=nodense",
            "model=dlrm_small", "logger=csv", "loader.batch_size=128", "loader.eval_batch_size=4096",
            "trainer.enable_progress_bar=false", "latency.repeats=3", "latency.batches=[1,256]",
            "optim.lr=1.0", "phases.pretrain_epochs=3", "phases.finetune_epochs=1",
            f"loader.cache_root={cache_dir}", *overrides])


def test_dense_training_without_dense_features(tmp_path, csv_path, cache_dir):
    summary = run(compose_no_dense(csv_path, cache_dir, []), tmp_path)
    assert summary["test_auc"] > 0.7  # f0, f1 carry a strong signal
    model = load_compressed(tmp_path / "compressed.pt") if (tmp_path / "compressed.pt").exists() else None
    assert model is None or not model.structure.use_dense


@pytest.mark.parametrize("overrides", [
    ["mode=joint", "budget.flops=0.5"],
    ["mode=input_selection", "budget.flops=0.7"],
    ["mode=embedding_reduction", "budget.params=0.5"],
    ["mode=magnitude", "budget.flops=0.5"],
    ["mode=taylor", "budget.flops=0.5"],
    ["mode=handcrafted", "budget.flops=0.5"],
    ["mode=mixed_dim", "budget.params=0.5"],
    ["mode=lowrank_feature", "budget.params=0.5"],
    ["mode=joint", "budget.flops=0.5", "model=dlrm_small_cat"],
    ["mode=cascaded", "budget.flops=0.5", "model=dlrm_small_cat"],
], ids=lambda o: "-".join(x.split("=")[1] for x in o))
def test_every_mode_compresses_a_model_without_dense_features(tmp_path, csv_path, cache_dir, overrides):
    summary = run(compose_no_dense(csv_path, cache_dir, overrides), tmp_path)
    model = load_compressed(tmp_path / "compressed.pt")
    assert not model.structure.use_dense and model.structure.bottom == []
    assert "dense" not in summary["features_removed"]  # there never was a dense block
    cost = measure(model)
    assert summary["budget_met"] is True
    assert cost.flops == summary["flops"] and cost.params == summary["params"]
    assert summary["test_auc"] > 0.6


@pytest.mark.parametrize("bottom", ["null", "[]"])
def test_no_bottom_mlp_is_refused_for_data_with_dense_features(tmp_path, cache_dir, bottom):
    from umec_lightning.config import ConfigError

    from .conftest import compose_cfg

    with pytest.raises(ConfigError, match="config key `model.bottom` is empty, but the data has 13 dense"):
        run(compose_cfg([f"model.bottom={bottom}"], cache_dir), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_bottom_null_trains_without_dense_features(tmp_path, csv_path, cache_dir):
    summary = run(compose_no_dense(csv_path, cache_dir, ["model.bottom=null", "phases.pretrain_epochs=1"]), tmp_path)
    assert summary["test_auc"] > 0.6
