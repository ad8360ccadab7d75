"""What the group-selection baselines share (magnitude, Taylor pruning, group lasso): the group sets of the
model in one packed grid with their resource model, kept on the model's device, and per-group sums of
per-slice quantities over that grid (differentiable, so group lasso's penalty uses them too)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .groups import KINDS, GroupSet, PackedGroups, build_group_sets, slice_sum  # noqa: F401 (re-export)
from .method import CompressionMethod, model_device
from .resource import RESOURCES, check_group_budgets, resource_model

DEFAULT_GROUPS = ("feature", "dim", "neuron")


def require_budget(budgets: dict[str, float | None], method: str) -> None:
    """A budget-targeting method needs at least one budget it knows."""
    unknown = set(budgets) - set(RESOURCES)
    if unknown:
        raise ValueError(f"unknown budget resources {sorted(unknown)}; choose from {RESOURCES}")
    if all(v is None for v in budgets.values()):
        raise ValueError(f"{method} prunes to a budget: set at least one of {RESOURCES} (budget.flops=0.5)")


class GroupPruning(CompressionMethod):
    """Shared by the group-selection baselines. `groups`: the kinds to prune (subset of feature, neuron,
    dim, pair); `dim_block`: embedding dims pruned that many at a time (one dim group = `dim_block`
    consecutive dims, as UMEC's `admm.dim_block`; 4 makes every pruned dim free shard memory under
    trainer=torchrec, whose tables are stored at multiples of 4 columns). After `setup`: `sets` (in packed
    row order), `packed`, and `resource` (on CPU: selection is a few hundred tiny sequential steps, where an
    accelerator only adds a sync per step)."""

    def __init__(self, groups=DEFAULT_GROUPS, per_resource: bool = False, dim_block: int = 1):
        # per_resource: rank groups by score per unit of resource saved (as UMEC's extraction does) instead
        # of by score alone, the published baselines' rule (see `selection.select_groups`).
        self.per_resource = bool(per_resource)
        self.kinds = list(dict.fromkeys(groups))
        unknown = set(self.kinds) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown group kinds {sorted(unknown)}; choose from {KINDS}")
        if not self.kinds:
            raise ValueError(f"{self.name} needs at least one group kind to prune")
        if isinstance(dim_block, bool) or not isinstance(dim_block, int) or dim_block < 1:
            raise ValueError(f"config key `mode.method.dim_block` must be an integer >= 1, got {dim_block!r}")
        self.dim_block = dim_block
        self.model = None
        self.budgets: dict[str, float] = {}
        self.packed: PackedGroups | None = None

    # ---- life cycle ------------------------------------------------------------------------------------
    def check(self, model, budgets: dict[str, float]) -> None:
        check_group_budgets(model, self.kinds, budgets, dim_block=self.dim_block)

    def setup(self, model, budgets: dict[str, float]) -> None:
        super().setup(model, budgets)
        self._build(build_group_sets(model, self.kinds, dim_block=self.dim_block))
        self.resource = resource_model(model, self.sets, device="cpu")

    def _build(self, sets: list[GroupSet]) -> None:
        """The packed grid and the slice map, where the group members' parameters are now."""
        param = sets[0].members[0].param
        for gs in sets:
            for m in gs.members:
                m.incidence = m.incidence.to(param.device)
        self.packed = PackedGroups(sets)
        self.sets = self.packed.sets
        self._device_key = (param.device, param.dtype)

    def to(self, device) -> None:
        """Rebuild the grid where the parameters are now (device and dtype); `device` documents intent."""
        if self.packed is None:
            return
        param = self.sets[0].members[0].param
        if (param.device, param.dtype) != self._device_key:
            self._build(self.sets)
            self._moved(param.device)

    def _moved(self, device: torch.device) -> None:
        """Subclasses move their own tensors here."""

    def _require_setup(self, model) -> None:
        if self.packed is None:
            raise RuntimeError(f"{self.name}: setup(model, budgets) must run before finish")
        self.to(model_device(model))

    # ---- per-group quantities --------------------------------------------------------------------------
    def group_sums(self, per_slice: Callable[[Tensor, int], Tensor], dtype: torch.dtype | None = None) -> Tensor:
        """(S, Gmax) grid of Σ per_slice over each group's slices (`PackedGroups.group_sums`)."""
        return self.packed.group_sums(per_slice, dtype)

    def masks(self, pruned: Tensor) -> dict[str, Tensor]:
        return self.packed.to_dict(pruned.to(self.packed.device))

    def features_of(self, pruned: Tensor) -> list[str]:
        """The labels of the feature groups marked in the grid `pruned`."""
        for l, gs in enumerate(self.sets):
            if gs.kind == "feature":
                return [label for label, gone in zip(gs.labels, pruned[l, : gs.num_groups].tolist()) if gone]
        return []

    def report(self, pruned: Tensor) -> dict:
        """Summary figures of a pruned grid: groups pruned in all and per kind, resource fractions left."""
        pruned = pruned.cpu()
        per_kind: dict[str, int] = {}
        for l, gs in enumerate(self.sets):
            per_kind[gs.kind] = per_kind.get(gs.kind, 0) + int(pruned[l, : gs.num_groups].sum())
        flops, params = self.resource.evaluate(pruned[None])
        return {"groups_pruned": int(pruned.sum()), "pruned_per_kind": per_kind,
                "flops": float(flops[0]), "params": float(params[0])}
