"""How useful each group is: one small part per criterion, shared by every method that ranks groups.

    Norm      the group's squared L2 norm v_g (what UMEC's paper ranks by; magnitude pruning, Li et al. 2016)
    Taylor    Σ_batches (Σ_{w in g} ∂ℓ/∂w·w)²: the first-order loss change of zeroing g, squared and
              accumulated (Molchanov et al. 2019; Taylor pruning, UMEC's warm-up and its completion)
    Holdout   Taylor, with the input-feature set scored by each feature's held-out loss increase when it is
              held at its mean (`ablation.mean_ablation_scores`): it does not count gradient noise as worth

A part says how it is fed (`feeds`) and returns an (S, Gmax) grid of scores over a `PackedGroups`, in its
row (set) order, "higher = keep":

    feeds            the caller's duty
    ()               nothing: `scores(packed)` reads the weights now
    ("gradients",)   `observe(packed)` after every backward pass it should count
    + "holdout"      `observe_holdout(model, packed, batches)` once, on held-out (dense, sparse, label) batches

Config picks a part by `_target_` (`group_score: {_target_: umec_lightning.compression.importance.Taylor}`)
or by its short name (`norm`, `taylor`, `holdout`; `resolve`), so `...group_score=holdout` on the command line
still works. A part holds what it has measured: a method takes its own `fresh()` copy.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from .ablation import mean_ablation_scores
from .groups import PackedGroups
from .method import ranks_reduced

log = logging.getLogger(__name__)

GRADIENTS = "gradients"
HOLDOUT = "holdout"


class Importance:
    """The interface: `name` (the config shorthand), `feeds` (see the module docstring), `observe`,
    `observe_holdout`, `scores`, `reset`."""

    name = "importance"
    feeds: tuple[str, ...] = ()

    @property
    def measured(self) -> bool:
        """Whether it needs feeding (its scores are measured, not read off the weights)."""
        return bool(self.feeds)

    def observe(self, packed: PackedGroups, grad_of: Callable | None = None, rank_local: bool = False) -> None:
        """After a backward pass: count its gradients (parts that feed on gradients)."""

    def observe_holdout(self, model, packed: PackedGroups, batches) -> None:
        """Once, with held-out batches (parts that feed on them)."""

    def scores(self, packed: PackedGroups) -> Tensor | None:
        """(S, Gmax) scores in `packed`'s order, higher = keep; None when nothing was measured yet."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget what was measured."""

    def to(self, device) -> Importance:
        """Move what was measured to `device`."""
        return self

    def fresh(self) -> Importance:
        """A copy of this part with nothing measured (each method, each UMEC owns its own)."""
        out = copy.deepcopy(self)
        out.reset()
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Norm(Importance):
    """v_g = Σ_{slices of g} ||slice||², read off the weights when asked (times the packed grid's
    `group_weight` where one is set: UMEC's weighted norms). In the grid's dtype (the parameters'), +inf in the
    padding. Norms of different sets are on different scales: callers put them on one (`normalise_by_set`, or
    UMEC's per-set scale c_l)."""

    name = "norm"

    def scores(self, packed: PackedGroups) -> Tensor:
        return packed.norms()


class Taylor(Importance):
    """I_g = Σ_batches (Σ_{w in g} ∂ℓ/∂w·w)² (Molchanov et al. 2019), float64; a slice shared by several
    groups (a `dot` pair column) counts in each, and under `dot` a dim group's term is its gate's grad·gate.

    `observe(packed)` after a training step's backward adds the step's squared sums (the gradients are the
    global batch's: DDP has averaged them). `observe(packed, grad_of, rank_local=True)` takes one batch of this
    process alone (calibration outside the training step): its unsquared sums are kept, and `scores` averages
    each batch's over the DDP ranks before squaring (`global_batch_scores`), so W ranks score what one process
    at batch W·B scores. `grad_of(param)` gives a parameter's gradient (default: its `.grad`)."""

    name = "taylor"
    feeds = (GRADIENTS,)

    def __init__(self):
        self.total: Tensor | None = None  # Σ of squared sums over the steps observed
        self.batch_sums: list[Tensor] = []  # rank_local: per batch, the unsquared sums

    def reset(self) -> None:
        self.total = None
        self.batch_sums = []

    @torch.no_grad()
    def observe(self, packed: PackedGroups, grad_of: Callable | None = None, rank_local: bool = False) -> None:
        if rank_local:
            self.batch_sums.append(packed.taylor_sums(grad_of))
            return
        score = packed.taylor_scores(grad_of)
        self.total = score if self.total is None else self.total + score

    def scores(self, packed: PackedGroups) -> Tensor | None:
        if self.batch_sums:
            return global_batch_scores(self.batch_sums)
        return self.total

    def to(self, device) -> Taylor:
        if self.total is not None:
            self.total = self.total.to(device)
        self.batch_sums = [s.to(device) for s in self.batch_sums]
        return self


class Holdout(Taylor):
    """Taylor for every set, except the input-feature set: there each feature's held-out loss increase when its
    vector is held at its mean (`observe_holdout`; averaged over DDP ranks, each on its own validation shard).
    A feature worth nothing or less on held-out data scores `FLOOR` (scores stay > 0). Until held-out scores
    are measured, or without a feature set, the scores are Taylor's."""

    name = "holdout"
    feeds = (GRADIENTS, HOLDOUT)
    FLOOR = 1e-12

    def __init__(self):
        super().__init__()
        self.feature_scores: Tensor | None = None  # (G,) float64 in the feature set's group order

    def reset(self) -> None:
        super().reset()
        self.feature_scores = None

    def observe_holdout(self, model, packed: PackedGroups, batches) -> None:
        row = feature_row(packed)
        if row is None or not batches:
            log.warning("group_score=holdout without held-out batches: the feature set keeps Taylor scores")
            return
        gs = packed.sets[row]
        scores = mean_ablation_scores(model, batches)
        out = torch.tensor([scores[label] for label in gs.labels], dtype=torch.float64, device=packed.device)
        if ranks_reduced() > 1:
            torch.distributed.all_reduce(out)
            out /= torch.distributed.get_world_size()
        log.info("held-out feature scores: %s", ", ".join(f"{k} {v:+.2e}" for k, v in zip(gs.labels, out.tolist())))
        self.feature_scores = out

    def scores(self, packed: PackedGroups) -> Tensor | None:
        taylor = super().scores(packed)
        row, held_out = feature_row(packed), self.feature_scores
        if row is None or held_out is None:
            return taylor
        out = taylor.clone() if taylor is not None else torch.zeros(
            packed.num_sets, packed.max_groups, dtype=torch.float64, device=packed.device)
        out[row, : held_out.numel()] = held_out.to(out).clamp(min=self.FLOOR)
        return out

    def to(self, device) -> Holdout:
        super().to(device)
        if self.feature_scores is not None:
            self.feature_scores = self.feature_scores.to(device)
        return self


PARTS: dict[str, type[Importance]] = {"norm": Norm, "taylor": Taylor, "holdout": Holdout}


def feature_row(packed: PackedGroups) -> int | None:
    """The packed row of the input-feature set (None without one)."""
    return next((l for l, gs in enumerate(packed.sets) if gs.kind == "feature"), None)


def resolve(value, key: str, allowed: tuple[str, ...] = tuple(PARTS)) -> Importance:
    """The part a config value names: a short name (`norm`, `taylor`, `holdout`), an `Importance` (what Hydra
    made of a `_target_` node), or a mapping with a `_target_` (instantiated here). ValueError naming the config
    `key` for anything else or a part outside `allowed`."""
    if isinstance(value, Mapping) and "_target_" in value:
        from hydra.utils import instantiate  # only for a node Hydra has not instantiated already

        try:
            value = instantiate(value)
        except Exception as err:  # noqa: BLE001 - Hydra wraps every lookup or constructor error the same way
            cause = err.__cause__ or err
            raise ValueError(f"config key `{key}`: {' '.join(str(cause).split())}") from None
    if isinstance(value, str) and value in allowed:
        return PARTS[value]()
    if isinstance(value, Importance) and value.name in allowed:
        return value
    targets = "|".join(PARTS[name].__name__ for name in allowed)
    shown = " ".join(repr(value).split())
    raise ValueError(f"config key `{key}` must be one of {allowed} or {{_target_: {__name__}.<{targets}>}}, "
                     f"got {shown}")


def global_batch_scores(sums: list[Tensor]) -> Tensor:
    """Σ_k s_k² over calibration batches k of their (S, Gmax) Taylor sums s_k. Under DDP (every rank calls
    it: a collective) s_k is the ranks' mean of their batch-k sums, i.e. the sum of the global batch k of
    W·B rows, so W ranks score what one process at batch W·B scores (the gradient of a mean is the mean of
    the ranks' gradients; squaring per rank first would add W times the per-rank gradient noise). Every
    rank uses the first n batches, n the fewest any rank saw."""
    stacked = torch.stack(sums)
    if ranks_reduced() > 1:
        n = torch.tensor([len(sums)], device=stacked.device)
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
        stacked = stacked[: int(n)].contiguous()
        torch.distributed.all_reduce(stacked)
        stacked /= torch.distributed.get_world_size()
    # (trainer=torchrec: rank 0 calibrates alone on the ranks' global batches of W·B rows: the same s_k.)
    return stacked.square().sum(0)
