"""The collapse guard through the real pipeline: a met budget on a model that lost what the dense one knew is
`quality_collapse` with its cause; a healthy compression is not; logloss deltas beside the AUC ones."""

import logging

from umec_lightning.run import run

from .conftest import compose_cfg

FAST = ["loader.limit_rows={train:8000}", "phases.finetune_epochs=0"]


def test_a_met_budget_on_a_destroyed_model_is_a_quality_collapse(tmp_path, cache_dir, caplog):
    # 2 % of the parameters, no finetune: the budget is met, the model is not the dense one any more.
    cfg = compose_cfg(["mode=magnitude", "budget.params=0.02", *FAST], cache_dir)
    with caplog.at_level(logging.WARNING):
        summary = run(cfg, tmp_path)
    assert summary["budget_met"] is True
    assert summary["quality_collapse"] is True and summary["lift_lost"] > summary["collapse_threshold"] == 0.2
    assert summary["lift_lost"] == (summary["dense_val_auc"] - summary["val_auc"]) / (summary["dense_val_auc"] - 0.5)
    cause = summary["quality_collapse_cause"]
    assert {f["name"] for f in cause["features"]} == set(summary["features_removed"])
    assert 0 < cause["share_of_importance"] <= 1
    assert any("quality collapse" in r.message for r in caplog.records)
    # The extraction's own damage, measured before any finetune (none here: the same model).
    assert summary["lift_lost_after_extraction"] == summary["lift_lost"]
    assert summary["delta_test_logloss"] == summary["test_logloss"] - summary["dense_test_logloss"]


def test_input_selection_says_what_importance_its_budget_forces_out(tmp_path, cache_dir):
    summary = run(compose_cfg(["mode=input_selection", "budget.params=0.3", *FAST], cache_dir), tmp_path)
    forced = summary["stages"]["compress"]["budget_forces_importance"]
    assert 0 <= forced["share_of_importance"] <= 1 and forced["features"]
    assert summary["quality_collapse"] is False  # the default synthetic data's noise features go first
