"""Is the compressed model still a model? The collapse guard, and what a feature budget costs in importance.

A compressed model that meets its budget can still have lost what the dense model knew (input selection that
had to drop the tables carrying the signal, at a coin's AUC). The measure is the share of the dense
model's lift over chance that is gone, on validation:

    lift_lost = (AUC_dense − AUC) / (AUC_dense − 0.5)

0 for a model as good as the dense one, 1 for a coin. A compressed run reports it after the extraction (before
any finetune: how much the surgery took) and for the final model; `quality_collapse` is the final model's
lift_lost above `eval.collapse_threshold` (default 0.2: a fifth of what the dense model knows over chance,
several seed stds of AUC on the data sets of docs/admm_schedule.md, where compressions that work lose a small
fraction of that). `budget_met` stays the plain resource fact.

The cause is named by held-out importance (`ablation.mean_ablation_scores` on the dense model): the removed
features with their scores and the share of the total positive importance they carried.
"""

from __future__ import annotations

import torch

from .groups import PackedGroups, build_group_sets
from .resource import resource_model
from .selection import select_groups


def lift_lost(dense_auc: float, auc: float) -> float:
    """Share of the dense model's AUC above 0.5 that `auc` has lost (≤ 0 when it is as good or better)."""
    lift = dense_auc - 0.5
    return (dense_auc - auc) / lift if lift > 1e-9 else 0.0


def importance_removed(scores: dict[str, float], removed: list[str]) -> dict:
    """The removed features by decreasing held-out importance and their share of the total positive one."""
    positive = {name: max(float(v), 0.0) for name, v in scores.items()}
    total = sum(positive.values())
    ranked = sorted(removed, key=lambda name: -positive.get(name, 0.0))
    share = sum(positive.get(name, 0.0) for name in removed) / total if total > 0 else 0.0
    return {"features": [{"name": name, "score": float(scores.get(name, 0.0))} for name in ranked],
            "share_of_importance": share}


def importance_a_budget_forces(model, scores: dict[str, float], budgets: dict[str, float]) -> dict | None:
    """For a method that removes input features only: the importance share the budget forces out, at least.

    The inputs the budget completion (`selection.select_groups`, the rule that ends every compress stage) would
    remove from the dense model, ranked by held-out importance (negative counts 0) per unit of the budgeted
    resources they free; the share is what they carried. A greedy, not the optimum of this knapsack, so the
    share is an estimate from above of the least any selection must give up. None when no budget is set or no
    selection of inputs meets it."""
    if not budgets:
        return None
    packed = PackedGroups(build_group_sets(model, {"feature"}))
    (features,) = packed.sets
    resource = resource_model(model, packed.sets, device=packed.device)
    worth = torch.zeros(packed.valid.shape, dtype=torch.float64)
    worth[0, : features.num_groups] = torch.tensor([max(float(scores.get(n, 0.0)), 0.0) for n in features.labels],
                                                   dtype=torch.float64)
    try:
        pruned, _ = select_groups(resource, packed, worth, budgets)
    except ValueError:  # no selection of inputs meets the budget
        return None
    return importance_removed(scores, [n for n, gone in zip(features.labels, pruned[0].tolist()) if gone])
