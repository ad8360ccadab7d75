"""MDEL (Ginart et al. 2019): mixed-dimension embeddings, d_i ∝ p_i^α, sized to the params budget.

Popularity. p_i is the mean probability that one of table i's rows is looked up by a query. A DLRM reads
exactly one row of every table per sample, so averaged over the table's n_i rows it is p_i = 1/n_i: the
rule needs table sizes only, no pass over the data (the authors' DLRM code, `md_solver`, does the same
with its per-table counts k = 1). Big tables (rare rows) get few dims, small tables (popular rows) many.

Rule. d_i = clamp(round(λ·p_i^α), 1, D) (round half up), D the table's current width, with λ the largest
value whose model meets budget.params (and budget.flops where set too). α = 0.3 by default: the
temperature of the authors' implementation in facebookresearch/dlrm (`--md-temperature 0.3`), a moderate
skew between α = 0 (uniform dims: every table narrowed alike) and α = 1 (dims ∝ 1/n_i, the tiny tables
keep everything while the big ones collapse to one column).

Model. A table narrowed to d_i < D is stored rows × d_i and its vector projected back to D (Ginart et al.'s
projection to the base dimension): under `dot` a Linear d_i -> D after the lookup (the interaction needs
one width), under DLRM's `cat` folded exactly into the top MLP's first layer (see `extract`). Any family that offers
"factorise" (`models.family`): D is a table's stored width (`structure.stored_dims`: a deep family's looked-up
vector, its first-order weight included), projected back as under `dot` unless the interaction is `cat`. Extraction
starts
both factors from the pretrained table's best rank-d_i approximation (truncated SVD), then the run
finetunes: nothing happens during the compress stage itself (0 epochs).

Costs. Only table widths change, and each table's change of params and FLOPs depends on its own width:
  dot, d_i < D:  rows·d_i + d_i·D params instead of rows·D; + 2·d_i·D FLOPs (the projection; every interaction
                 but `cat` alike)
  cat:           (rows + o)·(d_i − D) params and 2·o·(d_i − D) FLOPs, o = over.layers.0's outputs
Under `dot` a projection can cost more than it saves (rows < D²-ish, i.e. small tables): such a table
keeps its width D, which keeps the params monotone in λ. The widths only change where λ·p_i^α crosses
k − ½, so every breakpoint is costed (in one batched integer sum) and the largest feasible one wins: exact
even where the FLOPs are not monotone in λ (`dot`, where narrowing adds projection work). The winner is
verified with `cost.measure` on a meta-device DLRM of the structure extraction builds.
"""

from __future__ import annotations

import math

import torch

from ..models.cost import measure
from .extract import extracted_fractions
from .kept import Kept
from .method import CompressionMethod, Outcome
from .resource import RESOURCES

_HALF_UP = 1e-9  # (k − ½)/p^α · p^α + ½ may land a rounding error below k: keep the breakpoint's own width
_TOLERANCE = 1e-12


def mixed_dims(lam: torch.Tensor, popularity: torch.Tensor, alpha: float, full: torch.Tensor) -> torch.Tensor:
    """d_i = clamp(round half up(λ·p_i^α), 1, D_i) for a (C,) batch of λ and (T,) tables -> (C, T) int64."""
    raw = torch.floor(lam[:, None] * popularity[None, :].pow(alpha) + 0.5 + _HALF_UP)
    return torch.minimum(raw.clamp(min=1).to(torch.int64), full[None, :])


class MixedDim(CompressionMethod):
    """One-shot mixed-dimension tables: `finish` returns every group kept, with `ranks` set."""

    needs = frozenset({"factorise"})  # ranks and bases in the surgery

    name = "mixed_dim"

    def __init__(self, alpha: float = 0.3):
        if not alpha >= 0:
            raise ValueError(f"mixed_dim alpha must be >= 0, got {alpha}")
        self.alpha = float(alpha)
        self.budgets: dict[str, float] = {}

    def check(self, model, budgets: dict[str, float]) -> None:
        self.budgets = dict(budgets)
        self._choose(model, budgets)

    def finish(self, model) -> Outcome:
        lam, dims, reached = self._choose(model, self.budgets)
        kept = self._kept(model, dims)
        info = {"alpha": self.alpha, "lambda": lam, "dims": dims, **reached}
        return Outcome(kept=kept, info=info)

    # ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _kept(model, dims: dict[str, int]) -> Kept:
        kept = Kept.everything(model)
        full = dict(zip(model.structure.feature_names, model.structure.stored_dims))
        kept.ranks = {name: d for name, d in dims.items() if d < full[name]}  # full width: no entry
        return kept

    def _limits(self, model, budgets: dict[str, float]) -> dict[str, float]:
        unknown = set(budgets) - set(RESOURCES)
        if unknown:
            raise ValueError(f"unknown budget resources {sorted(unknown)}; choose from {RESOURCES}")
        limits = {k: float(v) for k, v in budgets.items() if v is not None}
        if "params" not in limits:
            raise ValueError(f"{self.name} sizes the embedding tables to a params budget: set budget.params")
        for name, value in limits.items():
            if not value > 0:
                raise ValueError(f"{name} budget must be a positive fraction of the model, got {value}")
        if model.structure.table_ranks is not None:
            raise ValueError(f"{self.name} starts from full-width tables; this model already projects "
                             f"{[model.structure.feature_names[f] for f in model.structure.projected()]}")
        if not model.structure.num_features:
            raise ValueError(f"{self.name} needs embedding tables; this model keeps none")
        return limits

    def _choose(self, model, budgets: dict[str, float]) -> tuple[float, dict[str, int], dict[str, float]]:
        """(λ, {table: d_i}, measured fractions) of the largest feasible λ; ValueError if none is."""
        limits = self._limits(model, budgets)
        s = model.structure
        rows = torch.tensor(s.table_sizes, dtype=torch.float64)
        full = torch.tensor(s.stored_dims, dtype=torch.int64)  # unprojected: each table's whole width
        popularity = 1.0 / rows
        scale = popularity.pow(self.alpha)
        # Breakpoints: the width of table i becomes k at λ = (k − ½)/p_i^α (k = 2..D_i); λ = 0: all 1 wide.
        steps = [(k - 0.5) / float(scale[i]) for i in range(len(rows)) for k in range(2, int(full[i]) + 1)]
        lams = torch.tensor(sorted({0.0, *steps}), dtype=torch.float64)
        widths = self._effective(model, mixed_dims(lams, popularity, self.alpha, full))  # (C, T)
        fractions = self._fractions(model, widths)
        feasible = torch.ones(len(lams), dtype=torch.bool)
        for name, value in limits.items():
            feasible &= fractions[name] <= value * (1 + _TOLERANCE)
        if not bool(feasible.any()):
            lowest = ", ".join(f"{n} {float(fractions[n].min()):.4g}" for n in limits)
            raise ValueError(
                f"{self.name} cannot meet budgets {limits}: the smallest reachable values are {lowest} of the "
                f"model (mixed-dimension tables down to 1 column; the MLPs are not touched)")
        best = int(torch.nonzero(feasible).max())  # the largest feasible λ (FLOPs need not be monotone)
        dims = {name: int(d) for name, d in zip(s.feature_names, widths[best])}
        reached = extracted_fractions(model, self._kept(model, dims))
        for name in RESOURCES:  # both are reported, so both must be what was predicted
            if not math.isclose(reached[name], float(fractions[name][best]), rel_tol=1e-9):
                raise RuntimeError(  # the two cost models disagree: a bug, not a budget
                    f"{self.name} dims {dims}: {name} measures {reached[name]:.9g}, "
                    f"predicted {float(fractions[name][best]):.9g}")
        return float(lams[best]), dims, reached

    @staticmethod
    def _effective(model, widths: torch.Tensor) -> torch.Tensor:
        """Where a projection follows (every interaction but `cat`), a width whose projection costs at least what
        it saves goes back to full width: rows·r + r·D >= rows·D, i.e. r >= rows·D/(rows + D)."""
        s = model.structure
        if s.interaction == "cat":
            return widths
        rows = torch.tensor(s.table_sizes, dtype=torch.int64)
        full = torch.tensor(s.stored_dims, dtype=torch.int64)
        wasteful = widths * (rows + full) >= rows * full
        return torch.where(wasteful, full.expand_as(widths), widths)

    @staticmethod
    def _fractions(model, widths: torch.Tensor) -> dict[str, torch.Tensor]:
        """(C,) params and FLOPs fractions of `model` for a (C, T) batch of table widths (module docstring)."""
        s = model.structure
        base = measure(model)
        rows = torch.tensor(s.table_sizes, dtype=torch.int64)
        full = torch.tensor(s.stored_dims, dtype=torch.int64)
        if s.interaction != "cat":  # projected back to D (`dot`, and every deep family)
            narrow = widths < full
            params = torch.where(narrow, rows * widths + widths * full, rows * full) - rows * full
            flops = torch.where(narrow, 2 * widths * full, torch.zeros_like(widths))
        else:
            out = model.over.layers[0].out_features
            params = (rows + out) * (widths - full)
            flops = 2 * out * (widths - full)
        gate = 0 if model.dim_gate is None else model.dim_gate.numel()  # extraction folds a gate away
        return {
            "params": (base.params - gate + params.sum(1)).double() / (base.params - gate),
            "flops": (base.flops + flops.sum(1)).double() / base.flops,
        }
