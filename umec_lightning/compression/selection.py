"""Which groups to cut under the budget(s), given any per-group score: one function for every method.

UMEC hands it the masks ADMM ended with (and the normalised group norms as scores); magnitude pruning the
group norms of the dense model and nothing pruned; Taylor pruning its accumulated importances. The rule:

  1. prune: while a budget is exceeded, remove the kept group with the smallest score per unit of resource
     it saves on the budgets still exceeded (savings beyond what a budget still needs do not count: no
     overshooting a 0.9 budget down to 0.6 because one big group has a small score). A set never loses
     its last group; a set stranded on a last group that alone exceeds the budget keeps a cheaper one
     instead (the swap that most lowers the excess).
  2. restore: while some removed group fits back under every budget, bring back the one with the largest
     score per unit of resource it costs (undoes overshoot: of ADMM, or of the last greedy step).

Scores are "higher = more useful" and compared across sets as they are: a method puts them on one scale
(e.g. `normalise_by_set`). Within a neuron or dimension set every group costs the same, so only that set's
lowest-scoring kept group (highest-scoring removed group) is a candidate: a step evaluates about one
variant per set plus one per feature (and pair) group, not one per group of the model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .groups import PackedGroups
from .resource import RESOURCES, ResourceModel

EQUAL_COST_KINDS = ("neuron", "dim")
_TOLERANCE = 1e-12


def normalise_by_set(scores: Tensor, valid: Tensor) -> Tensor:
    """Each set's scores in units of its mean score (padding untouched): puts sets on one scale."""
    scores = scores.to(torch.float64)
    mean = torch.where(valid, scores, 0.0).sum(1) / valid.sum(1).clamp(min=1)
    mean = torch.where(mean > 0, mean, torch.ones_like(mean))
    return torch.where(valid, scores / mean[:, None], scores)


def _candidates(eligible: Tensor, scores: Tensor, equal_cost: Tensor, largest: bool) -> Tensor:
    """(C, 2) grid cells to try: every eligible cell of a set whose groups differ in cost, and the single
    best eligible cell (lowest score, or highest if `largest`) of an equal-cost set."""
    fill = float("-inf") if largest else float("inf")
    masked = scores.masked_fill(~eligible, fill)
    best = masked.argmax(1) if largest else masked.argmin(1)
    rows = torch.nonzero(equal_cost & eligible.any(1)).flatten()
    single = torch.stack([rows, best[rows]], 1)
    several = torch.nonzero(eligible & ~equal_cost[:, None])
    return torch.cat([single, several]).reshape(-1, 2)


def _resources(resource: ResourceModel, pruned: Tensor, index: Tensor) -> Tensor:
    """(B, V) fractions of the dense model for a (V, S, G) batch of masks, the budgets' rows only."""
    flops, params = resource.evaluate(pruned)
    return torch.stack([flops, params]).index_select(0, index)


def _swap_last_group_(resource: ResourceModel, pruned: Tensor, valid: Tensor, scores: Tensor, index: Tensor,
                      limit: Tensor, now: Tensor) -> bool:
    """In place: in a set down to its last group, keep instead the removed group of that set that most lowers
    the excess over the budgets (`now`: the budgets' resources of `pruned`; ties: the higher score). False when
    no such swap lowers the excess, so that repeated swaps end."""
    excess = (now - limit).clamp(min=0).sum()
    last = (valid & ~pruned).sum(1) == 1
    moves = [(int(l), int(g), int(h)) for l in torch.nonzero(last).flatten()
             for g in torch.nonzero(valid[l] & ~pruned[l]).flatten()
             for h in torch.nonzero(valid[l] & pruned[l]).flatten()]
    if not moves:
        return False
    variants = pruned[None].repeat(len(moves), 1, 1)
    for v, (l, g, h) in enumerate(moves):
        variants[v, l, g], variants[v, l, h] = True, False
    after = (_resources(resource, variants, index) - limit[:, None]).clamp(min=0).sum(0)  # (V,)
    value = torch.tensor([float(scores[l, h]) for l, _, h in moves], dtype=torch.float64, device=after.device)
    gain = excess - after
    if not bool(gain.max() > _TOLERANCE):
        return False
    best = int(torch.argmax(torch.where(gain >= gain.max() - _TOLERANCE, value, float("-inf"))))
    l, g, h = moves[best]
    pruned[l, g], pruned[l, h] = True, False
    return True


@torch.no_grad()
def select_groups(resource: ResourceModel, packed: PackedGroups, scores: Tensor, budgets: dict[str, float],
                  pruned: Tensor | None = None, restore: bool = True,
                  per_resource: bool = True) -> tuple[Tensor, dict[str, int]]:
    """The pruned grid (S, Gmax) bool meeting every budget, starting from `pruned` (default: nothing).

    `resource` and `packed` must describe the same sets in the same (packed) order; `scores` (S, Gmax) is
    in that order too (padding ignored). `budgets` are fractions of the model `resource` was built on.
    `per_resource` False ranks by score alone (the baselines as published: "remove the smallest-norm
    groups"), among the groups that save something on an exceeded budget; restoring then brings back the
    highest-scoring group that fits. Returns the grid and {"pruned_to_meet_budget": n,
    "restored_under_budget": m}. Raises ValueError when no choice of groups meets the budgets.
    """
    device = resource.device
    valid = packed.valid.to(device)
    scores = scores.to(device=device, dtype=torch.float64)
    pruned = torch.zeros_like(valid) if pruned is None else pruned.to(device=device, dtype=torch.bool).clone()
    pruned &= valid
    names = [n for n in RESOURCES if budgets.get(n) is not None]
    index = torch.tensor([RESOURCES.index(n) for n in names], device=device)
    limit = torch.tensor([float(budgets[n]) for n in names], dtype=torch.float64, device=device)
    num_groups = packed.num_groups.to(device)
    equal_cost = torch.tensor([gs.kind in EQUAL_COST_KINDS for gs in packed.sets], device=device)
    info = {"pruned_to_meet_budget": 0, "restored_under_budget": 0}
    if not names:
        return pruned, info

    while True:
        now = _resources(resource, pruned[None], index)[:, 0]
        over = now > limit * (1 + _TOLERANCE)
        if not bool(over.any()):
            break
        room = pruned.sum(1) < num_groups - 1  # the set can lose one more group
        cells = _candidates(valid & ~pruned & room[:, None], scores, equal_cost, largest=False)
        if cells.numel() == 0:
            # Greedy cuts can strand a set on an expensive last group (input selection under a tight FLOPs budget
            # on the Kaggle layout: every sparse feature cut, the dense block kept, still over): swap it for a
            # cheaper one.
            if _swap_last_group_(resource, pruned, valid, scores, index, limit, now):
                info["pruned_to_meet_budget"] += 1
                continue
            raise ValueError(f"cannot meet budgets {budgets}: every group set is down to one group")
        variants = pruned[None].repeat(len(cells), 1, 1)
        variants[torch.arange(len(cells), device=device), cells[:, 0], cells[:, 1]] = True
        after = _resources(resource, variants, index)  # (B, C)
        needed = (now - limit).clamp(min=0)[:, None]
        saving = (torch.minimum(now[:, None] - after, needed) * over[:, None]).sum(0)
        value = scores[cells[:, 0], cells[:, 1]]
        ratio = torch.where(saving > 0, value / saving if per_resource else value, float("inf"))
        best = int(torch.argmin(ratio))
        if not torch.isfinite(ratio[best]):
            raise ValueError(f"cannot meet budgets {budgets}: no remaining group saves resource")
        pruned[cells[best, 0], cells[best, 1]] = True
        info["pruned_to_meet_budget"] += 1

    while restore:
        cells = _candidates(pruned & valid, scores, equal_cost, largest=True)
        if cells.numel() == 0:
            break
        variants = pruned[None].repeat(len(cells), 1, 1)
        variants[torch.arange(len(cells), device=device), cells[:, 0], cells[:, 1]] = False
        after = _resources(resource, variants, index)  # (B, C)
        now = _resources(resource, pruned[None], index)  # (B, 1)
        fits = (after <= limit[:, None] * (1 + _TOLERANCE)).all(0)
        cost = (after - now).sum(0)
        ok = fits & (cost > 0)
        if not bool(ok.any()):
            break
        value = scores[cells[:, 0], cells[:, 1]]
        ratio = torch.where(ok, value / cost.clamp(min=1e-30) if per_resource else value, float("-inf"))
        best = int(torch.argmax(ratio))
        pruned[cells[best, 0], cells[best, 1]] = False
        info["restored_under_budget"] += 1
    return pruned, info
