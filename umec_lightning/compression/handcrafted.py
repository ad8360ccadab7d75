"""Handcrafted baseline: uniformly narrower MLPs meeting the budget, trained from scratch.

Every hidden layer gets the same width ratio ρ: w' = max(1, round(w·ρ)) (round half up) for the bottom-MLP
layers and the top-MLP layers but the logit; under `dot` the last bottom layer is the embedding dim and keeps
its width (the tables are not touched either). ρ is the largest ratio whose model meets every budget
(budgets["flops"], and "params" where given: tables dominate the parameters, so a small params budget is
unreachable and `check` says which value is the smallest reachable).

The widths only change where ρ crosses (k − ½)/w for some layer width w, so the candidates are those
breakpoints (and 1): all of them are costed in one batched `ResourceModel` call over the neuron sets (the
same count as `cost.measure`, "the k last neurons of every layer pruned"); cost grows with ρ, so the
feasible candidates are a prefix and the last of it wins. The winner is verified with `cost.measure` on a
meta-device DLRM of the structure that extraction builds. The decision reads shapes only: a `scratch`
stage calls `finish` on the dense model before any training and trains a fresh model of
`extracted_structure(model, kept)`.
"""

from __future__ import annotations

import math

import torch

from .extract import extracted_fractions
from .groups import build_group_sets
from .kept import Kept
from .method import CompressionMethod, Outcome
from .pruning import require_budget
from .resource import RESOURCES, resource_model

_HALF_UP = 1e-9  # (k − ½)/w · w + ½ may land a rounding error below k: keep the breakpoint's own width


def narrowed(width: int, ratio: float) -> int:
    """w' = max(1, round half up(w·ρ))."""
    return max(1, min(width, math.floor(width * ratio + 0.5 + _HALF_UP)))


class Handcrafted(CompressionMethod):
    """The same width ratio in every hidden layer, the largest that meets the budget(s)."""

    name = "handcrafted"

    def __init__(self):
        self.budgets: dict[str, float] = {}

    def check(self, model, budgets: dict[str, float]) -> None:
        self.budgets = dict(budgets)  # a `scratch` stage may call `finish` right after (no training)
        self._choose(model, budgets)

    def finish(self, model) -> Outcome:
        ratio, widths, reached = self._choose(model, self.budgets)
        kept = Kept.everything(model)
        kept.neurons.update({name: list(range(w)) for name, w in widths.items()})
        return Outcome(kept=kept, info={"width_ratio": ratio, "widths": widths, **reached})

    # ---------------------------------------------------------------------------------------------------
    def _choose(self, model, budgets: dict[str, float]) -> tuple[float, dict[str, int], dict[str, float]]:
        """(ρ, {layer: w'}, measured fractions) of the largest feasible ratio; ValueError if none is."""
        require_budget(budgets, self.name)
        limits = {k: float(v) for k, v in budgets.items() if v is not None}
        for name, value in limits.items():
            if not value > 0:
                raise ValueError(f"{name} budget must be a positive fraction of the dense model, got {value}")
        sets = build_group_sets(model, ["neuron"])  # exactly the narrowed layers (not `dot`'s last bottom)
        layers = [gs.name.removeprefix("neurons:") for gs in sets]
        full = [gs.num_groups for gs in sets]
        ratios = sorted({1.0, 0.0} | {(k - 0.5) / w for w in full for k in range(2, w + 1)})
        fractions = self._fractions(model, sets, full, ratios)  # {resource: (len(ratios),)}
        feasible = torch.ones(len(ratios), dtype=torch.bool)
        for name, value in limits.items():
            feasible &= fractions[name] <= value * (1 + 1e-12)
        if not bool(feasible[0]):
            lowest = ", ".join(f"{n} {float(fractions[n][0]):.4g}" for n in limits)
            raise ValueError(
                f"budgets {limits} are unreachable by narrowing the MLPs: with every hidden layer 1 wide the model "
                f"still needs {lowest} of the dense model (the embedding tables are not narrowed)")
        # Fractions grow with ρ, so the feasible candidates are a prefix: take its last one.
        best = int(torch.nonzero(feasible).max())
        ratio = ratios[best]
        widths = {name: narrowed(w, ratio) for name, w in zip(layers, full)}
        kept = Kept.everything(model)
        kept.neurons.update({name: list(range(w)) for name, w in widths.items()})
        reached = extracted_fractions(model, kept)
        for name, value in limits.items():
            if reached[name] > value * (1 + 1e-12):  # the two cost models disagree: a bug, not a budget
                raise RuntimeError(f"handcrafted widths {widths} measure {name} {reached[name]:.6g} > {value}")
        return ratio, widths, reached

    @staticmethod
    def _fractions(model, sets, full: list[int], ratios: list[float]) -> dict[str, torch.Tensor]:
        """Fractions of the dense model per resource for every candidate ratio, in one batched call."""
        if not sets:  # nothing to narrow: every ratio is the dense model
            return {name: torch.ones(len(ratios), dtype=torch.float64) for name in RESOURCES}
        # Under `cat` the table dims ride along as never-pruned sets: ResourceModel miscounts the top MLP's
        # input under `cat` when no dim set is present (its per-table dim constants come after that column).
        extra = build_group_sets(model, ["dim"]) if model.structure.interaction == "cat" else []
        resource = resource_model(model, sets + extra, device="cpu")
        widths = [gs.num_groups for gs in extra]
        kept = torch.tensor([[narrowed(w, r) for w in full] + widths for r in ratios])  # (V, S)
        cols = torch.arange(resource.max_groups)
        sizes = torch.tensor(full + widths)
        # The last w − w' neurons of every layer are the pruned ones (padding beyond w ignored).
        grid = (cols >= kept[:, :, None]) & (cols < sizes[None, :, None])
        flops, params = resource.evaluate(grid)
        return {"flops": flops, "params": params}
