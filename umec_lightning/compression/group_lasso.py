"""Group lasso (the UMEC paper's eq. 1 baseline): a sparsity penalty during training, then a threshold.

    ℓ(W) + λ · Σ_sets Σ_g ||W_g||₂,    ||W_g||₂ = sqrt(v_g),  v_g = Σ_{slices i in g} ||slice_i||²

over every group of the chosen kinds (input features, embedding dims, neurons: one λ for all, as in the
paper's sweeps). At the end, a group whose L2 norm is below `threshold` is removed (paper: 0.01 on Kaggle,
0.001 on Terabyte); every set keeps at least its largest group. The method does not target a budget: the
compression it reaches is whatever λ and the threshold give. summary.json reports it measured on the extracted
model: `flops_ratio` and `params_ratio` (kept / dense: 1.0 when nothing was removed) and `reduction` (the share
removed: 0.0 when nothing was); the outcome's info has `groups_removed` and the fractions kept per resource.

Why a loss term and not a proximal group soft-threshold after each step. The prox would give exact zeros,
but it is the prox of *plain SGD* with that step's lr: under momentum or Adam it is not, and for
overlapping groups (a `dot` pair column lies in two feature groups) it has no closed form. The penalty as a
loss term is the paper's formulation, works with any optimizer, and is what the interface's `loss` hook is
for. Its price is that (sub)gradient descent only brings a group norm to within about lr·λ of zero, where
it hovers; the threshold exists for that (lr·λ = 1e-4 at the paper's settings, 100× below 0.01).

v_g is computed differentiably from the set members (slice sums of squares scattered to the groups, one
op per parameter: `GroupPruning.group_sums`); sqrt(v_g + 1e-12) keeps the gradient finite at v_g = 0.
Under `dot` a dimension group is its dim-gate entry, so the penalty is λ·|gate_j|.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .groups import build_group_sets, kept_from_masks
from .method import Outcome
from .pruning import DEFAULT_GROUPS, GroupPruning, slice_sum

_EPS = 1e-12


def _slice_squares(param: Tensor, dim: int) -> Tensor:
    return slice_sum(param.square(), dim)


class GroupLasso(GroupPruning):
    """groups: kinds penalised and thresholded; lam: λ; threshold: on a group's L2 norm sqrt(v_g)."""

    name = "group_lasso"
    targets_budget = False  # the run does not require a budget for this method

    def __init__(self, groups=DEFAULT_GROUPS, lam: float = 0.001, threshold: float = 0.01, dim_block: int = 1):
        super().__init__(groups, dim_block=dim_block)
        if lam < 0 or threshold < 0:
            raise ValueError(f"lam and threshold must be non-negative, got {lam}, {threshold}")
        self.lam = float(lam)
        self.threshold = float(threshold)
        self._penalty: Tensor | None = None

    def check(self, model, budgets: dict[str, float]) -> None:
        """Only the group kinds are checked: budgets (possibly empty) are not this method's target."""
        if not build_group_sets(model, self.kinds, dim_block=self.dim_block):
            raise ValueError(f"no group set to prune for kinds {self.kinds}")

    def group_l2(self) -> Tensor:
        """(S, Gmax) differentiable group L2 norms sqrt(v_g + 1e-12); 0 in the padding."""
        v = self.group_sums(_slice_squares)
        return torch.where(self.packed.valid, torch.sqrt(v + _EPS), torch.zeros_like(v))

    def loss(self, model) -> Tensor:
        penalty = self.group_l2().sum()
        self._penalty = penalty.detach()
        return self.lam * penalty

    @torch.no_grad()
    def removed(self) -> Tensor:
        """(S, Gmax) bool: groups with L2 norm below the threshold, except each set's largest."""
        norms = self.packed.norms().to(torch.float64).sqrt()
        valid = self.packed.valid
        removed = (norms < self.threshold) & valid
        largest = norms.masked_fill(~valid, float("-inf")).argmax(1)
        removed[torch.arange(self.packed.num_sets, device=removed.device), largest] = False
        return removed

    def log_values(self) -> dict[str, float]:
        out = {"group_lasso/below_threshold": float(self.removed().sum())}
        if self._penalty is not None:
            out["group_lasso/penalty"] = float(self._penalty)
        return out

    def pruned_features(self) -> list[str]:
        return self.features_of(self.removed())

    def finish(self, model) -> Outcome:
        self._require_setup(model)
        removed = self.removed()
        kept = kept_from_masks(model, self.sets, self.masks(removed))
        report = self.report(removed)
        info = {"groups_removed": report["groups_pruned"], "removed_per_kind": report["pruned_per_kind"],
                "flops": report["flops"], "params": report["params"], "lam": self.lam, "threshold": self.threshold}
        return Outcome(kept=kept, info=info)
