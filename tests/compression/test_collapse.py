"""The collapse guard's arithmetic and the importance a feature budget forces out (compression/collapse.py)."""

import pytest

from umec_lightning.compression.collapse import importance_a_budget_forces, importance_removed, lift_lost
from umec_lightning.compression.extract import extracted_fractions
from umec_lightning.compression.kept import Kept

from .conftest import tiny


def test_lift_lost_is_the_share_of_the_dense_models_auc_above_chance():
    assert lift_lost(0.9, 0.9) == 0
    assert lift_lost(0.9, 0.5) == pytest.approx(1.0)
    assert lift_lost(0.9, 0.8) == pytest.approx(0.25)
    assert lift_lost(0.9, 0.95) < 0  # better than dense
    assert lift_lost(0.5, 0.4) == 0  # a dense model at chance has nothing to lose


def test_importance_removed_ranks_and_shares_the_positive_importance():
    scores = {"a": 0.3, "b": 0.1, "c": -0.2, "d": 0.6}
    out = importance_removed(scores, ["c", "b", "d"])
    assert [f["name"] for f in out["features"]] == ["d", "b", "c"]
    assert out["share_of_importance"] == pytest.approx(0.7)  # (0.6 + 0.1) / 1.0: a negative score counts 0


def test_the_forced_share_removes_the_cheapest_importance_per_resource_until_the_budget_is_met():
    model = tiny(sizes=(10, 200, 300))  # C2 and C3 hold nearly all the parameters
    scores = {"dense": 0.5, "C1": 0.01, "C2": 0.4, "C3": 0.09}
    # params 0.5: dropping C3 alone (most parameters per unit of importance) meets it.
    kept = Kept.everything(model)
    kept.feature_ids = [0, 1]
    assert extracted_fractions(model, kept)["params"] <= 0.5
    out = importance_a_budget_forces(model, scores, {"params": 0.5})
    assert [f["name"] for f in out["features"]] == ["C3"]
    assert out["share_of_importance"] == pytest.approx(0.09)
    # params 0.1 needs C2 and C3 gone: 49 % of the importance.
    out = importance_a_budget_forces(model, scores, {"params": 0.1})
    assert {f["name"] for f in out["features"]} >= {"C2", "C3"}
    assert out["share_of_importance"] >= 0.49
    assert importance_a_budget_forces(model, scores, {}) is None


def test_the_forced_share_when_only_dropping_the_most_important_input_meets_the_budget():
    """A FLOPs budget that the dense block alone exceeds: the greedy drops every sparse feature first and used to
    give up (None), so input_selection at flops 0.5 on the Criteo sample started without a word and collapsed."""
    model = tiny(sizes=(10, 20, 30), bottom=(64, 4))  # the bottom MLP holds most of the FLOPs
    scores = {"dense": 0.9, "C1": 0.05, "C2": 0.03, "C3": 0.02}
    only_dense = Kept.everything(model)
    only_dense.feature_ids = []
    assert extracted_fractions(model, only_dense)["flops"] > 0.5
    out = importance_a_budget_forces(model, scores, {"flops": 0.5})
    assert out is not None and out["features"][0]["name"] == "dense"
    assert out["share_of_importance"] >= 0.9
