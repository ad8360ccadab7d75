"""Magnitude pruning (MP; Li et al. 2016): one shot, the groups of smallest norm, to the budget.

At the end of its compress stage (which trains 0 epochs: the model is the trained dense one) every group is
scored by its squared L2 norm v_g (`importance.Norm`), the scores are put on one scale across sets
(`normalise_by_set`: each set in units of its mean) and `select_groups` removes the lowest-scoring groups
until every budget is met (by score alone, as published; `per_resource=true` ranks by score per unit of
resource saved instead, which on the synthetic data removed the dense block first: docs/results.md).
Finetuning follows in the next stage.

One exception to "the group's own norm": under `dot` the dimension groups live on the dim gate, which is
all ones before any compression, so its norms say nothing. A dim j is then scored by the weights that
removing it deletes: column j of every table (its mean square per row, so that each table has one say
whatever its size) and row j of the bottom MLP's last layer, scaled by gate_j²; a dim group of `dim_block`
dims scores the sum of its dims'. This reads every table once, at the end of the stage, never per step
(under trainer=torchrec on rank 0, which holds the tables of record).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .groups import kept_from_masks
from .importance import Norm
from .method import Outcome, model_device
from .pruning import GroupPruning, require_budget
from .selection import normalise_by_set, select_groups


class Magnitude(GroupPruning):
    """MP: score = squared group norm of the trained dense model (see the module docstring), one shot."""

    name = "magnitude"
    score = Norm()  # reads the weights when asked: nothing to feed, nothing held

    def check(self, model, budgets: dict[str, float]) -> None:
        require_budget(budgets, self.name)
        super().check(model, budgets)

    @torch.no_grad()
    def scores(self, model) -> Tensor:
        """(S, Gmax) float64 scores, "higher = keep", each set in units of its mean."""
        scores = self.score.scores(self.packed).to(torch.float64)
        if model.structure.interaction == "dot" and "dims" in self.packed.names:
            l = self.packed.names.index("dims")
            energy = _dot_dim_energy(model).view(-1, self.dim_block).sum(1)  # consecutive dims per group
            scores[l, : energy.numel()] = energy
        return normalise_by_set(scores, self.packed.valid)

    def finish(self, model) -> Outcome:
        self._require_setup(model)
        pruned, info = select_groups(self.resource, self.packed, self.scores(model), self.budgets,
                                     per_resource=self.per_resource)
        kept = kept_from_masks(model, self.sets, self.masks(pruned))
        return Outcome(kept=kept, info={**self.report(pruned), **info})


@torch.no_grad()
def _dot_dim_energy(model) -> Tensor:
    """(D,) float64: what removing dim j deletes under `dot`, gate_j² · (Σ_tables mean_rows E[:, j]² +
    ||W_last[j, :]||² + b_last[j]²). `vector_norm` reduces a table without a squared copy of it."""
    dim = model.structure.dim
    energy = torch.zeros(dim, dtype=torch.float64, device=model_device(model))
    for table in model.sparse.tables.values():
        col = torch.linalg.vector_norm(table.weight.detach(), dim=0).to(torch.float64)
        energy += col.square() / table.num_embeddings
    if model.dense is not None:
        last = model.dense.layers[-1]
        energy += (last.weight.detach().square().sum(1) + last.bias.detach().square()).to(torch.float64)
    if model.dim_gate is not None:
        energy *= model.dim_gate.detach().to(torch.float64).square()
    return energy
