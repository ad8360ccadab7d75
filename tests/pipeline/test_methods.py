"""Every compression method through the real config and pipeline: the same summary fields, measured on the
saved extracted model, and the budget met (group lasso: the CR it reached, reported honestly)."""

import pytest

from umec_lightning import load_compressed
from umec_lightning.models import measure
from umec_lightning.run import run

from .conftest import compose_cfg

ROWS = "loader.limit_rows={train:6000,val:2000,test:2000}"
FAST = ["phases.pretrain_epochs=1", "phases.compress_epochs=1", "phases.finetune_epochs=1", ROWS]
# What every compressed run's summary.json says, whichever method made it.
COMMON_KEYS = {"mode", "method", "budget", "budget_met", "flops", "params", "bytes", "flops_ratio", "params_ratio",
               "reduction", "kept", "features_removed", "noise_features_removed",
               "informative_features_removed", "feature_pruning_order", "dense_test_auc", "test_auc",
               "delta_test_auc", "val_auc", "latency_ms", "stages", "compressed_path"}


@pytest.mark.parametrize("overrides", [
    ["mode=magnitude", "budget.flops=0.5"],
    ["mode=taylor", "budget.flops=0.5", "mode.method.steps_per_round=10"],
    ["mode=handcrafted", "budget.flops=0.5"],
    ["mode=cascaded", "budget.flops=0.6", "model=dlrm_small_cat"],
    ["mode=mixed_dim", "budget.params=0.5"],
    ["mode=mixed_dim", "budget.params=0.5", "model=dlrm_small_cat"],
    ["mode=lowrank_svd", "budget.params=0.5"],
    ["mode=joint_lowrank", "budget.params=0.5", "mode.method.calibration_batches=5"],
    ["mode=lowrank_feature", "budget.params=0.5", "mode.method.calibration_batches=5"],
    ["mode=lowrank_feature", "budget.flops=0.6", "model=dlrm_small_cat", "mode.method.calibration_batches=5"],
], ids=lambda o: "-".join(x.split("=")[1] for x in o if x.startswith(("mode=", "model="))))
def test_method_meets_the_budget_measured_on_the_saved_model(tmp_path, cache_dir, overrides):
    summary = run(compose_cfg([*overrides, *FAST], cache_dir), tmp_path)
    assert COMMON_KEYS <= set(summary)
    assert summary["budget_met"] is True
    for resource, fraction in summary["budget"].items():
        assert summary[f"{resource}_ratio"] <= fraction
    model = load_compressed(tmp_path / "compressed.pt")
    cost = measure(model)
    assert (cost.flops, cost.params) == (summary["flops"], summary["params"])
    assert summary["flops_ratio"] == cost.flops / summary["dense_flops"]
    assert summary["delta_test_auc"] == pytest.approx(summary["test_auc"] - summary["dense_test_auc"])
    if summary["mode"].startswith("lowrank"):
        ranks = summary["stages"]["compress"]["ranks"]
        assert ranks and set(summary["stages"]["compress"]["explained_variance"]) <= set(ranks)


def test_handcrafted_trains_from_scratch_for_the_total_epochs(tmp_path, cache_dir):
    summary = run(compose_cfg(["mode=handcrafted", "budget.flops=0.5", *FAST], cache_dir), tmp_path)
    scratch = summary["stages"]["scratch"]
    steps_per_epoch = summary["stages"]["scratch"]["steps"] // 3
    assert steps_per_epoch == summary["pretrain"]["steps"]  # 3 epochs = pretrain + compress + finetune
    widths = summary["kept"]["neurons"]
    assert widths["over.layers.0"] < 16 and 0 < scratch["width_ratio"] < 1


def test_group_lasso_reports_the_compression_it_reached_without_a_budget(tmp_path, cache_dir):
    cfg = compose_cfg(["mode=group_lasso", "mode.method.lam=0.05", "mode.method.threshold=0.05", *FAST], cache_dir)
    summary = run(cfg, tmp_path)
    assert summary["budget"] == {} and summary["budget_met"] is None
    assert summary["params_ratio"] < 1 or summary["flops_ratio"] < 1  # a large λ removes groups
    assert summary["reduction"]["flops"] == pytest.approx(1 - summary["flops_ratio"])
    cost = measure(load_compressed(tmp_path / "compressed.pt"))
    assert cost.flops == summary["flops"]


def test_budget_targeting_method_without_a_budget_fails_before_work(tmp_path, cache_dir):
    from umec_lightning.config import ConfigError

    with pytest.raises(ConfigError, match="needs a budget"):
        run(compose_cfg(["mode=magnitude", *FAST], cache_dir), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_dense_control_trains_as_long_as_a_compressed_run(tmp_path, cache_dir):
    summary = run(compose_cfg(["mode=dense_control", *FAST], cache_dir), tmp_path)
    steps_per_epoch = summary["steps"] // 3
    assert summary["mode"] == "dense_control" and summary["steps"] == 3 * steps_per_epoch > 0


def test_every_experiment_composes_with_its_sweep(cache_dir):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    conf = Path(__file__).resolve().parents[2] / "conf"
    for path in sorted((conf / "experiment").glob("*.yaml")):
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose("config", overrides=[f"experiment={path.stem}"], return_hydra_config=True)
        params = cfg.hydra.sweeper.params
        modes = str(params.mode).split(",") if "mode" in params else []
        for mode in modes:
            assert (conf / "mode" / f"{mode}.yaml").exists(), (path.stem, mode)
        arms = str(params["+arm"]).split(",") if "+arm" in params else []
        assert modes or arms, path.stem
        for arm in arms:  # every arm composes with the experiment, into a mode of conf/mode/
            with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
                member = compose("config", overrides=[f"experiment={path.stem}", f"+arm={arm}"])
            assert (conf / "mode" / f"{member.mode.name}.yaml").exists(), (path.stem, arm)


def test_factor_activation_without_a_finetune_stage_fails_before_work(tmp_path, cache_dir):
    from umec_lightning.config import ConfigError

    overrides = ["mode=lowrank_svd", "budget.params=0.5", "mode.method.factor_activation=true",
                 "mode.stages=[pretrain,{kind:compress,epochs:0}]", *FAST]
    with pytest.raises(ConfigError, match="needs a finetune stage"):
        run(compose_cfg(overrides, cache_dir), tmp_path)
    assert not (tmp_path / "checkpoints").exists()
