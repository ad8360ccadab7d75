"""End-to-end compression runs through the real config: pretrain -> ADMM -> extraction -> finetune -> test."""

import json

import pytest
import torch

from umec_lightning import load_compressed
from umec_lightning.config import ConfigError
from umec_lightning.latency import random_inputs
from umec_lightning.models import DLRM, DLRMStructure, measure
from umec_lightning.run import run

from .conftest import compose_cfg, read_summary

FAST = ["phases.pretrain_epochs=1", "phases.compress_epochs=1", "phases.finetune_epochs=1"]


@pytest.mark.parametrize("mode, budget", [
    ("joint", "budget.flops=0.5"),
    ("input_selection", "budget.flops=0.9"),
    ("embedding_reduction", "budget.params=0.5"),
    ("prediction", "budget.flops=0.6"),
])
def test_compression_modes_meet_the_budget_on_the_extracted_model(tmp_path, cache_dir, mode, budget):
    cfg = compose_cfg([f"mode={mode}", budget, *FAST], cache_dir)
    summary = run(cfg, tmp_path)
    resource, fraction = budget.split("=")[0].split(".")[1], float(budget.split("=")[1])
    assert summary["budget"] == {resource: fraction}
    assert summary["budget_met"] is True
    assert summary[f"{resource}_ratio"] <= fraction
    # Every number is measured on the saved, physically smaller model.
    model = load_compressed(tmp_path / "compressed.pt")
    cost = measure(model)
    assert (cost.flops, cost.params) == (summary["flops"], summary["params"])
    assert summary["flops_ratio"] == cost.flops / summary["dense_flops"]
    assert summary["params"] < summary["dense_params"] or resource == "flops"
    for key in ("dense_test_auc", "dense_test_accuracy", "test_auc", "test_accuracy", "latency_ms", "kept",
                "noise_features_removed", "informative_features_removed", "feature_pruning_order"):
        assert key in summary
    assert set(summary["latency_ms"]["compressed"]) == {"batch_1", "batch_256"}
    latency = summary["latency_ms"]  # dense and compressed timed interleaved, at a stated thread count
    assert latency["interleaved"] is True and latency["threads"] == 1
    assert set(latency["ratio"]) == {"batch_1", "batch_256"}
    for spread in latency["ratio"].values():
        assert 0 < spread["p25"] <= spread["median"] <= spread["p75"]
    assert (tmp_path / "sparsity_curves.png").stat().st_size > 1000
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    history = json.loads((tmp_path / "sparsity_history.json").read_text())["history"]
    assert history[0]["step"] < history[-1]["step"]
    assert any(k.startswith("z/") for k in history[-1])
    # The curves reached the CSV logger too.
    header = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "compress/resource/flops" in header and "compress/loss" in header
    assert "pretrain/val/auc" in header and "finetune/val/auc" in header  # one series per phase


def test_compressed_model_reloads_with_the_same_predictions(tmp_path, cache_dir):
    cfg = compose_cfg(["mode=joint", "budget.flops=0.5", *FAST, "phases.finetune_epochs=0"], cache_dir)
    run(cfg, tmp_path)
    a = load_compressed(tmp_path / "compressed.pt")
    b = load_compressed(tmp_path / "compressed.pt")
    dense, sparse = random_inputs(a, 64, seed=1)
    torch.testing.assert_close(a(dense, sparse), b(dense, sparse), rtol=0, atol=0)
    kept = read_summary(tmp_path)["kept"]
    assert kept["features"] == (["dense"] if a.structure.use_dense else []) + a.structure.feature_names


@pytest.mark.parametrize("optim", [[], pytest.param(["optim=adam", "optim.lr=0.01"], marks=pytest.mark.slow)],
                         ids=["sgd", "adam"])  # the same resume under Adam: slow (its moments ride in the checkpoint)
def test_resumed_compression_ends_like_an_uninterrupted_run(tmp_path, cache_dir, optim):
    """Under Adam the prox's per-group steps come from the optimizer's state (admm.prox_step=adaptive): restored
    from the checkpoint, they resume bit for bit too."""
    common = ["mode=joint", "budget.flops=0.5", "phases.pretrain_epochs=1", "phases.compress_epochs=2",
              "phases.finetune_epochs=1", "loader.limit_rows={train:6000,val:2000,test:2000}", *optim]
    whole = run(compose_cfg(common, cache_dir), tmp_path / "whole")
    interrupted = compose_cfg([*common, "debug.interrupt={phase:compress,epoch:1}"], cache_dir)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        run(interrupted, tmp_path / "resumed")
    assert not (tmp_path / "resumed" / "summary.json").exists()
    resumed = run(compose_cfg([*common, "resume=true"], cache_dir), tmp_path / "resumed")
    assert resumed["kept"] == whole["kept"]
    for key in ("flops", "params", "test_auc", "test_logloss", "val_auc"):
        assert resumed[key] == pytest.approx(whole[key], abs=1e-6), key
    a = json.loads((tmp_path / "whole" / "kept.json").read_text())
    b = json.loads((tmp_path / "resumed" / "kept.json").read_text())
    assert a["state"] == b["state"]  # s, y, z and Adam moments, bit for bit


@pytest.mark.parametrize("overrides, message", [
    (["mode=prediction", "budget.params=0.001"], "budget"),
    (["mode=joint", "model=dlrm_small_cat", "mode.method.groups=[feature,pair]", "budget.flops=0.5"], "pair"),
    (["mode=joint", "budget.flops=0.5", "mode.method.admm.eta_s=nan"], r"mode.method.admm.eta_s` must be a finite"),
    (["mode=joint", "budget.flops=0.5", "mode.method.admm.eta_z=-1"], r"mode.method.admm.eta_z` must be a finite"),
    (["mode=dense", "budget.flops=0.5"], "compresses nothing"),
])
def test_unreachable_budget_or_missing_group_set_fails_before_training(tmp_path, cache_dir, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run(compose_cfg(overrides, cache_dir), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_pretrained_checkpoint_from_another_model_is_refused(tmp_path, cache_dir):
    run(compose_cfg(["phases.pretrain_epochs=1", "loader.limit_rows={train:2000,val:1000,test:1000}"], cache_dir),
        tmp_path / "dense")
    ckpt = tmp_path / "dense" / "checkpoints" / "pretrain" / "best.ckpt"
    ok = run(compose_cfg(["mode=prediction", "budget.flops=0.7", f"pretrained={ckpt}", "phases.compress_epochs=1",
                          "phases.finetune_epochs=0", "loader.limit_rows={train:2000,val:1000,test:1000}"],
                         cache_dir), tmp_path / "reuse")
    assert ok["pretrain"]["pretrained"] == str(ckpt)
    # A checkpoint from before `table_ranks` existed (its structure lacks the key) and from before the tables
    # were grouped (one `sparse.tables.<name>.weight` each) is the same model.
    old = torch.load(ckpt, weights_only=False)
    del old["dlrm_structure"]["table_ranks"]
    with torch.device("meta"):  # the layout of the groups only
        layout = DLRM(DLRMStructure.from_dict(old["dlrm_structure"])).sparse
    state = old["state_dict"]
    fused = [state.pop(f"model.sparse.groups.{g}.weight") for g in range(len(layout.groups))]
    for name, table in layout.tables.items():
        weight = fused[list(layout.groups).index(table.group)]
        state[f"model.sparse.tables.{name}.weight"] = weight[table.offset: table.offset + table.num_embeddings]
    torch.save(old, tmp_path / "old.ckpt")
    again = run(compose_cfg(["mode=prediction", "budget.flops=0.7", f"pretrained={tmp_path / 'old.ckpt'}",
                             "phases.compress_epochs=0", "phases.finetune_epochs=0",
                             "loader.limit_rows={train:2000,val:1000,test:1000}"], cache_dir), tmp_path / "old")
    assert again["dense_test_auc"] == ok["dense_test_auc"]
    with pytest.raises(ConfigError, match=r"pretrained.*differs in interaction"):
        run(compose_cfg(["mode=joint", "model=dlrm_small_cat", "budget.flops=0.5", f"pretrained={ckpt}"],
                        cache_dir), tmp_path / "other")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=r"pretrained.*junk.ckpt is not a Lightning checkpoint"):
        run(compose_cfg(["mode=joint", "budget.flops=0.5", f"pretrained={tmp_path / 'junk.ckpt'}"], cache_dir),
            tmp_path / "junk")


# A bottom MLP worth a third of the FLOPs, and data whose signal is mostly in the dense features: the
# cheapest way to the budget in FLOPs per norm is to drop the dense block, the worst in AUC.
DENSE_SIGNAL = ["model.bottom=[64,32,4]", "data.dense_scale=1.5", "data.main_effect_scale=0.1",
                "data.interaction_scale=0.1", "phases.pretrain_epochs=1", "phases.finetune_epochs=1"]


def test_extraction_keeps_a_dense_block_that_carries_the_signal_and_warns_when_it_forced(tmp_path, cache_dir):
    """No ADMM step at all (compress_epochs=0): the completion makes the whole reduction, ranked by measured
    Taylor loss change per unit of resource. It must keep the dense block, and say it forced the budget."""
    cfg = compose_cfg(["mode=joint", "budget.flops=0.6", "phases.compress_epochs=0", *DENSE_SIGNAL], cache_dir)
    summary = run(cfg, tmp_path)
    stage = summary["stages"]["compress"]
    assert summary["budget_met"] is True and summary["flops_ratio"] <= 0.6
    assert "dense" not in summary["features_removed"]
    assert load_compressed(tmp_path / "compressed.pt").structure.use_dense
    assert stage["budget_met_by"] == "extraction" and stage["forced_share_of_reduction"] == pytest.approx(1.0)
    assert stage["extra_groups_pruned_at_extraction"] > 0 and "forced at extraction" in stage["warning"]
    assert stage["features_restored_at_extraction"] == []  # nothing was pruned by ADMM to restore
    assert stage["enforce_score"] == "taylor" and stage["resource_after_admm"]["flops"] == pytest.approx(1.0)
    # The scenario discriminates: ranked by group norms, the same completion drops the dense block.
    norm = run(compose_cfg(["mode=joint", "budget.flops=0.6", "phases.compress_epochs=0", *DENSE_SIGNAL,
                            "mode.method.enforce_score=norm"], cache_dir), tmp_path / "norm")
    assert "dense" in norm["features_removed"] and norm["test_auc"] < summary["test_auc"] - 0.05


def test_compress_stage_length_in_steps(tmp_path, cache_dir):
    cfg = compose_cfg(["mode=joint", "budget.flops=0.5", "phases.compress_steps=7",
                       "loader.limit_rows={train:2000,val:1000,test:1000}", *FAST], cache_dir)
    stage = run(cfg, tmp_path)["stages"]["compress"]
    # joint's warm-up is 5 % of the stage, at least 1 step: the other 6 are ADMM steps.
    assert stage["steps"] == 7 and stage["admm_steps"] == 6


@pytest.mark.parametrize("overrides, message", [
    (["phases.compress_steps=-3"], "phases.compress_steps` must be an integer >= 0"),
    (["mode.stages=[{kind:pretrain,steps:5}]"], "only a compress stage runs for a number of steps"),
])
def test_bad_step_counts_are_refused(tmp_path, cache_dir, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run(compose_cfg(["mode=joint", "budget.flops=0.5", *overrides], cache_dir), tmp_path)


@pytest.mark.parametrize("model", ["dlrm_small", "dlrm_small_cat"])
def test_dims_pruned_in_blocks_keep_whole_blocks_and_meet_the_budget(tmp_path, cache_dir, model):
    """mode.method.admm.dim_block=2 (widths 4): every kept table width is a whole number of blocks, the
    budget is met on the saved model, and a block that does not divide the widths is refused first."""
    from umec_lightning.config import ConfigError

    overrides = [f"model={model}", "mode=embedding_reduction", "budget.params=0.7", *FAST]
    summary = run(compose_cfg([*overrides, "mode.method.admm.dim_block=2"], cache_dir), tmp_path / "b2")
    assert summary["budget_met"] is True
    widths = summary["kept"]["dims"].values()
    assert all(w % 2 == 0 for w in widths) and min(widths) < 4  # dims were pruned, two at a time
    with pytest.raises(ConfigError, match="dim_block"):
        run(compose_cfg([*overrides, "mode.method.admm.dim_block=3"], cache_dir), tmp_path / "b3")
    assert not (tmp_path / "b3" / "checkpoints").exists()
