"""Is the compressed model still a model? The collapse guard, and what a feature budget costs in importance.

A compressed model that meets its budget can still have lost what the dense model knew (input selection that
had to drop the two tables carrying the signal: validation AUC 0.49). The measure is the share of the dense
model's lift over chance that is gone, on validation:

    lift_lost = (AUC_dense − AUC) / (AUC_dense − 0.5)

0 for a model as good as the dense one, 1 for a coin. A compressed run reports it after the extraction (before
any finetune: how much the surgery took) and for the final model; `quality_collapse` is the final model's
lift_lost above `eval.collapse_threshold` (default 0.2: a fifth of what the dense model knows over chance,
about 0.09 AUC on Frappe-like data and 0.05 on the Criteo sample, several seed stds; compressions that work
lose under 0.05 of it). `budget_met` stays the plain resource fact.

The cause is named by held-out importance (`ablation.mean_ablation_scores` on the dense model): the removed
features with their scores and the share of the total positive importance they carried.
"""

from __future__ import annotations

from .extract import extracted_fractions
from .kept import Kept


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

    Greedy: features leave in increasing order of held-out importance per unit of the budgeted resources they
    free (measured on the structure extraction would build, `extracted_fractions`) until every budget is met
    (or, where that leaves only an input that alone exceeds the budget, every input but the most important one
    that fits alone), then those that fit back return; the share is what the rest carried. Greedy is not the
    optimum of this knapsack, so the share is an estimate from above of the least any selection must give up.
    None when no budget is set or no single input meets it."""
    if not budgets:
        return None
    structure = model.structure
    names = (["dense"] if structure.use_dense else []) + structure.feature_names
    everything = Kept.everything(model)

    def kept_without(gone: set[str]) -> Kept:
        kept = Kept.from_dict(everything.to_dict())
        kept.use_dense = structure.use_dense and "dense" not in gone
        kept.feature_ids = [fid for fid, name in zip(structure.feature_ids, structure.feature_names)
                            if name not in gone]
        return kept

    def saved(name: str) -> float:
        fractions = extracted_fractions(model, kept_without({name}))
        return sum(1.0 - fractions[k] for k in budgets)

    def meets(gone: set[str]) -> bool:
        fractions = extracted_fractions(model, kept_without(gone))
        return all(fractions[k] <= b + 1e-12 for k, b in budgets.items())

    def worth(name: str) -> float:
        return max(float(scores.get(name, 0.0)), 0.0)

    order = sorted(names, key=lambda n: worth(n) / max(saved(n), 1e-12))
    gone: set[str] = set()
    for name in order[:-1]:  # one input stays
        if meets(gone):
            break
        gone.add(name)
    if not meets(gone):
        # Stranded on an input that alone exceeds the budget (the dense block under a FLOPs budget on the Kaggle
        # layout): keep instead the most important input that fits alone.
        alone = [n for n in names if meets(set(names) - {n})]
        if not alone:
            return None
        gone = set(names) - {max(alone, key=worth)}
    # Bring back what still fits, most important per unit of resource first (the greedy may have overshot).
    for name in sorted(gone, key=lambda n: -worth(n) / max(saved(n), 1e-12)):
        if meets(gone - {name}):
            gone.remove(name)
    return importance_removed(scores, sorted(gone, key=names.index))
