"""ADMM does the compression itself on short stages (issue 22): under the default (relative) schedule the
extraction forces at most a tenth of the reduction; under the paper's absolute steps it did most of it."""

import pytest

from umec_lightning.run import run

from .conftest import CONF, SMALL, compose_cfg

NO_FINETUNE = ["phases.finetune_epochs=0"]


def _share(summary: dict) -> float:
    return summary["stages"]["compress"]["forced_share_of_reduction"]


def test_admm_meets_the_budget_itself_on_a_125_step_stage(tmp_path, cache_dir):
    summary = run(compose_cfg(["mode=joint", "budget.flops=0.5", *NO_FINETUNE], cache_dir), tmp_path)
    assert summary["stages"]["compress"]["admm_steps"] < 130
    assert summary["stages"]["compress"]["budget_met_by"] == "admm"
    assert _share(summary) <= 0.10 and summary["budget_met"]


# joint at flops and input_selection at its hardest budget run by default; the other four are `slow` (make test's
# 10 minutes): each holds the same ADMM schedule to another group kind or budget.
@pytest.mark.parametrize("mode, budget", [("joint", "flops=0.5"),
                                          pytest.param("joint", "params=0.5", marks=pytest.mark.slow),
                                          pytest.param("input_selection", "params=0.5", marks=pytest.mark.slow),
                                          ("input_selection", "flops=0.3"),
                                          pytest.param("embedding_reduction", "params=0.5", marks=pytest.mark.slow),
                                          pytest.param("cascaded", "flops=0.5", marks=pytest.mark.slow)])
def test_admm_meets_the_budget_itself_on_the_criteo_sample_with_sgd(tmp_path, cache_dir, mode, budget):
    """The shipped SGD settings on the real Criteo sample: a compress stage of one epoch is 67 steps (the
    paper's absolute steps left 63-92 % of the reduction to the extraction here, and cascaded's second stage 72 %
    with plain norms; docs/admm_schedule.md). Every compress stage of the run is held to it (cascaded has two).
    input_selection at flops 0.3 is met only without the dense block (46 % forced while ADMM ranked it by worth)."""
    from hydra import compose, initialize_config_dir

    shared = [o for o in SMALL if not o.startswith(("data.", "model=", "optim."))]
    overrides = [*shared, f"loader.cache_root={cache_dir}", "experiment=real_data", "reference.dir=null",
                 f"mode={mode}", "budget.params=null", f"budget.{budget}", *NO_FINETUNE]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        summary = run(compose("config", overrides=overrides), tmp_path)
    shares = {name: stage["forced_share_of_reduction"] for name, stage in summary["stages"].items()
              if "forced_share_of_reduction" in stage}
    assert len(shares) == (2 if mode == "cascaded" else 1)
    assert max(shares.values()) <= 0.10 and summary["budget_met"], shares


@pytest.mark.slow  # ~8 s; the Criteo-sample cases above check ADMM meeting the budget itself in the default run
def test_admm_meets_the_budget_itself_under_adam(tmp_path):
    """The capacity preset's Adam settings (lr 1e-3, batch 1024) on a 56-step stage: with the nominal prox the
    pruned tables regrew ~lr per weight per step, y climbed with z, and ADMM stopped one table short of flops 0.5
    (0.508); the adaptive prox (the step Adam took) holds them at zero and ADMM meets it."""
    from hydra import compose, initialize_config_dir

    overrides = [f"loader.cache_root={tmp_path / 'cache'}", "experiment=synthetic_capacity", "reference.dir=null",
                 "logger=csv", "trainer.enable_progress_bar=false", "latency.repeats=1", "latency.batches=[1]",
                 "data.rows.train=60000", "data.rows.val=5000", "data.rows.test=5000", "phases.pretrain_epochs=2",
                 "mode=input_selection", "budget.params=null", "budget.flops=0.5", *NO_FINETUNE]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        summary = run(compose("config", overrides=overrides), tmp_path / "run")
    stage = summary["stages"]["compress"]
    assert stage["budget_met_by"] == "admm" and _share(summary) == 0.0, stage["resource_after_admm"]
