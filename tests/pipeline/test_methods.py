"""Every mode (each `conf/mode/*.yaml`, found by listing the folder) through the real config and pipeline: the same
summary fields, measured on the saved extracted model, and the budget met (group lasso: the CR it reached, reported
honestly); a mode that compresses nothing trains as long as its stages say."""

import math

import pytest
from omegaconf import OmegaConf

from umec_lightning import load_compressed
from umec_lightning.config import ConfigError
from umec_lightning.models import measure
from umec_lightning.reference import total_epochs
from umec_lightning.run import build_datamodule, check_config, check_stages, dense_structure_for, run
from umec_lightning.stages import parse_stages

from .conftest import CONF, compose_cfg

ROWS = "loader.limit_rows={train:6000,val:2000,test:2000}"
STEPS_PER_EPOCH = math.ceil(6000 / 128)  # train rows / loader.batch_size
FAST = ["phases.pretrain_epochs=1", "phases.compress_epochs=1", "phases.finetune_epochs=1", ROWS]
# What every compressed run's summary.json says, whichever method made it.
COMMON_KEYS = {"mode", "method", "budget", "budget_met", "flops", "params", "bytes", "flops_ratio", "params_ratio",
               "reduction", "kept", "features_removed", "noise_features_removed",
               "informative_features_removed", "feature_pruning_order", "dense_test_auc", "test_auc",
               "delta_test_auc", "val_auc", "latency_ms", "stages", "compressed_path"}

MODES = sorted(p.stem for p in (CONF / "mode").glob("*.yaml"))
# The budgets a mode runs under, in order: the first every method of the mode accepts on the test model (the run's
# own check before any work), so a mode that sizes to params only (mixed_dim) gets params.
BUDGETS = (["budget.flops=0.5"], ["budget.params=0.5"])
# Settings of a mode's method for a short run, whichever method has the key: shorter Taylor rounds, fewer
# calibration batches, a group lasso strong enough to remove groups in one short epoch.
SHRINK = {"steps_per_round": 10, "calibration_batches": 5, "lam": 0.05, "threshold": 0.05}
# Beyond every mode under `dot`: the `cat` interaction where extraction differs (no projection to D, table
# decoders folded into the top MLP, the cascade's second stage on a model without pairs).
CAT = ["mixed_dim", "lowrank_feature", "cascaded"]


def _served_budget(overrides: list[str], cache_dir) -> list[str] | None:
    """The first of BUDGETS that every method of the run accepts on the test data's model, or None."""
    for budget in BUDGETS:
        cfg = compose_cfg([*overrides, *budget], cache_dir)
        stages = check_config(cfg)
        datamodule = build_datamodule(cfg)
        datamodule.ensure_ready()
        try:
            check_stages(cfg, stages, dense_structure_for(cfg.model, datamodule.meta))
        except ConfigError:
            continue
        return budget
    return None


# Modes that store quantized tables: tests/pipeline/test_quant.py runs three of them in the default run (exports,
# a bytes budget, quantization-aware finetuning); here all of them, in the slow set.
QUANT = {m for m in MODES if any((s if isinstance(s, str) else s.get("kind")) == "quantize"
                                 for s in OmegaConf.load(CONF / "mode" / f"{m}.yaml").get("stages", []))}


@pytest.mark.parametrize("mode, model", [pytest.param(m, "dlrm_small", marks=[pytest.mark.slow] if m in QUANT else [])
                                         for m in MODES] + [(m, "dlrm_small_cat") for m in CAT])
def test_every_mode_runs_and_reports_what_it_measured_on_the_saved_model(tmp_path, cache_dir, mode, model):
    method = OmegaConf.load(CONF / "mode" / f"{mode}.yaml").get("method") or {}
    overrides = [f"mode={mode}", f"model={model}", *FAST,
                 *(f"mode.method.{key}={value}" for key, value in SHRINK.items() if key in method)]
    cfg = compose_cfg(overrides, cache_dir)
    stages = parse_stages(cfg)
    methods = {stage.name: stage.make_method() for stage in stages if stage.method is not None}
    if not methods and mode not in QUANT:  # compresses nothing: the dense model, trained as its stages say
        summary = run(cfg, tmp_path)
        assert summary["mode"] == mode and summary["method"] is None
        assert summary["steps"] == total_epochs(stages) * STEPS_PER_EPOCH  # dense_control: 3 epochs, dense: 1
        assert {"test_auc", "val_auc"} <= set(summary) and not (tmp_path / "compressed.pt").exists()
        assert not (COMMON_KEYS - {"mode", "method", "test_auc", "val_auc"}) & set(summary)  # no compression figures
        return
    # Quantized modes: 0.6 of the dense bytes, which int8 tables meet alone; 0.3 where low rank pays for the rest
    # (at 0.6 the chosen widths meet it and low rank has nothing left to do).
    quant_budget = "budget.bytes=0.3" if any(m.name.startswith("lowrank") for m in methods.values()) \
        else "budget.bytes=0.6"
    budget = [quant_budget] if mode in QUANT else _served_budget(overrides, cache_dir) \
        if any(m.targets_budget for m in methods.values()) else []
    if budget is None:
        pytest.skip(f"mode={mode} serves none of the budgets {BUDGETS} on {model}")
    summary = run(compose_cfg([*overrides, *budget], cache_dir), tmp_path)
    assert summary["mode"] == mode and COMMON_KEYS <= set(summary)
    if budget:
        assert summary["budget_met"] is True
        assert summary["budget"] == {key.split("=")[0].split(".")[1]: float(key.split("=")[1]) for key in budget}
    else:  # no budget targeted (group lasso): the reduction it reached, reported as such
        assert summary["budget"] == {} and summary["budget_met"] is None
        assert summary["params_ratio"] < 1 or summary["flops_ratio"] < 1  # a large λ removes groups
        assert summary["reduction"]["flops"] == pytest.approx(1 - summary["flops_ratio"])
    for resource, fraction in summary["budget"].items():
        assert summary[f"{resource}_ratio"] <= fraction
    model = load_compressed(tmp_path / "compressed.pt")
    cost = measure(model)
    assert (cost.flops, cost.params) == (summary["flops"], summary["params"])
    assert summary["flops_ratio"] == cost.flops / summary["dense_flops"]
    assert summary["delta_test_auc"] == pytest.approx(summary["test_auc"] - summary["dense_test_auc"])
    for name, method in methods.items():  # a low-rank stage: the ranks it chose, and what they explain
        if method.name.startswith("lowrank"):
            figures = summary["stages"][name]
            assert figures["ranks"] and set(figures["explained_variance"]) <= set(figures["ranks"])


def test_handcrafted_trains_from_scratch_for_the_total_epochs(tmp_path, cache_dir):
    summary = run(compose_cfg(["mode=handcrafted", "budget.flops=0.5", *FAST], cache_dir), tmp_path)
    scratch = summary["stages"]["scratch"]
    steps_per_epoch = summary["stages"]["scratch"]["steps"] // 3
    assert steps_per_epoch == summary["pretrain"]["steps"]  # 3 epochs = pretrain + compress + finetune
    widths = summary["kept"]["neurons"]
    assert widths["over.layers.0"] < 16 and 0 < scratch["width_ratio"] < 1


def test_budget_targeting_method_without_a_budget_fails_before_work(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match="needs a budget"):
        run(compose_cfg(["mode=magnitude", *FAST], cache_dir), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_factor_activation_without_a_finetune_stage_fails_before_work(tmp_path, cache_dir):
    overrides = ["mode=lowrank_svd", "budget.params=0.5", "mode.method.factor_activation=true",
                 "mode.stages=[pretrain,{kind:compress,epochs:0}]", *FAST]
    with pytest.raises(ConfigError, match="needs a finetune stage"):
        run(compose_cfg(overrides, cache_dir), tmp_path)
    assert not (tmp_path / "checkpoints").exists()
