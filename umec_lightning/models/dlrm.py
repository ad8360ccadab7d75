"""DLRM (Naumov et al. 2019), faithful to facebookresearch/dlrm, built from a `DLRMStructure`.

Shape letters: B batch, N dense inputs (13 for Criteo), S sparse inputs of the data (26 for Criteo),
F kept sparse features (tables), D embedding dim (`dot`), P kept interaction pairs.

Stable names (what compression addresses):
  sparse.tables[<feature name>]   one EmbeddingBag per kept sparse feature, keyed by its name ("C1"...),
                                  stored at the table's rank r_f (its full width when not projected)
  sparse.projections[<name>]      Linear(r_f, d_f, bias=False), only for tables with r_f < d_f
  dense.layers.<i>                bottom-MLP Linear layers (ReLU after every one, the last too)
  over.layers.<i>                 top-MLP Linear layers (ReLU after all but the last, which gives the logit)
  dim_gate                        optional (D,) per-dimension gate under `dot`, only while compressing
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .structure import DLRMStructure


def _init_linear(layer: nn.Linear, generator: torch.Generator | None = None) -> None:
    """Reference init: W ~ N(0, sqrt(2/(in+out))), b ~ N(0, sqrt(1/out))."""
    fan_out, fan_in = layer.weight.shape
    with torch.no_grad():
        layer.weight.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)), generator=generator)
        layer.bias.normal_(0.0, math.sqrt(1.0 / fan_out), generator=generator)


class Projection(nn.Linear):
    """Linear(r, d, bias=False) after a table stored at rank r < d. `position` is the table's index in
    SparseArch's output list (an int attribute: TorchScript scripts it, unlike an empty dict)."""

    def __init__(self, rank: int, dim: int, position: int):
        super().__init__(rank, dim, bias=False)
        self.position = position


class SparseArch(nn.Module):
    """Embedding lookups: sparse ids (B, S) -> list of F vectors (B, D_f), one id per sample per table.

    A table stored at rank r_f < D_f looks up (B, r_f) and projects it to (B, D_f) with its own Linear.
    """

    def __init__(self, structure: DLRMStructure, sparse_grad: bool = True):
        super().__init__()
        self.feature_names = structure.feature_names
        self.tables = nn.ModuleDict(
            {
                name: nn.EmbeddingBag(rows, rank, mode="sum", sparse=sparse_grad)
                for name, rows, rank in zip(self.feature_names, structure.table_sizes, structure.stored_dims)
            }
        )
        self.projections = nn.ModuleDict(
            {
                self.feature_names[f]: Projection(structure.stored_dims[f], structure.table_dims[f], f)
                for f in structure.projected()
            }
        )
        # Which column of the data's sparse block feeds each table; derived, so not checkpointed.
        self.register_buffer(
            "feature_ids", torch.tensor(structure.feature_ids, dtype=torch.long), persistent=False
        )

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Tables ~ U(±sqrt(1/rows)) (reference); projections like the reference Linear, N(0, sqrt(2/(in+out)))."""
        with torch.no_grad():
            for table in self.tables.values():
                bound = math.sqrt(1.0 / table.num_embeddings)
                table.weight.uniform_(-bound, bound, generator=generator)
            for projection in self.projections.values():
                fan_out, fan_in = projection.weight.shape
                projection.weight.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)), generator=generator)

    def forward(self, sparse: Tensor) -> list[Tensor]:
        ids = sparse.index_select(1, self.feature_ids) if len(self.feature_names) else sparse[:, :0]
        out = [table(ids[:, k : k + 1]) for k, table in enumerate(self.tables.values())]
        for projection in self.projections.values():  # empty for a model without projections
            out[projection.position] = projection(out[projection.position])
        return out


class MLP(nn.Module):
    """Stack of Linear layers: (B, in) -> (B, widths[-1]). ReLU after every layer, or all but the last."""

    def __init__(self, in_features: int, widths: list[int], relu_last: bool):
        super().__init__()
        sizes = [in_features, *widths]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.relu_last = relu_last

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for layer in self.layers:
            _init_linear(layer, generator)

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < last or self.relu_last:
                x = torch.relu(x)
        return x


class InteractionArch(nn.Module):
    """Feature interaction.

    dot: T = stack([bottom_out, e_1 .. e_F]) (B, V, D); Z = T Tᵀ; out = cat(bottom_out, Z[:, i, j] for the
         kept pairs (i, j)) -> (B, bottom_out + P).
    cat: out = cat(bottom_out, e_1 .. e_F) -> (B, bottom_out + Σ D_f).
    """

    def __init__(self, structure: DLRMStructure):
        super().__init__()
        self.kind = structure.interaction
        pairs = structure.kept_pairs() if self.kind == "dot" else []
        self.register_buffer("li", torch.tensor([p[0] for p in pairs], dtype=torch.long), persistent=False)
        self.register_buffer("lj", torch.tensor([p[1] for p in pairs], dtype=torch.long), persistent=False)
        self.num_vectors = structure.num_vectors

    def forward(self, bottom_out: Tensor | None, embeddings: list[Tensor], gate: Tensor | None = None) -> Tensor:
        """`gate` (D,), `dot` only: multiplies every vector of T (one op on the stacked tensor)."""
        head = [] if bottom_out is None else [bottom_out]
        if self.kind == "cat":
            return torch.cat(head + embeddings, dim=1)
        t = torch.stack(head + embeddings, dim=1)  # (B, V, D)
        if gate is not None:
            t = t * gate
            head = [t[:, 0]] if head else []
        z = torch.bmm(t, t.transpose(1, 2))  # (B, V, V)
        return torch.cat(head + [z[:, self.li, self.lj]], dim=1)


class DLRM(nn.Module):
    """DLRM: dense (B, N) and sparse (B, S) inputs -> logits (B,). The loss lives outside the model."""

    def __init__(self, structure: DLRMStructure, sparse_grad: bool = True, seed: int | None = None):
        super().__init__()
        self.structure = structure
        self.sparse = SparseArch(structure, sparse_grad=sparse_grad)
        self.dense = MLP(structure.num_dense, structure.bottom, relu_last=True) if structure.use_dense else None
        self.interaction = InteractionArch(structure)
        self.over = MLP(structure.interaction_out, structure.top, relu_last=False)
        self.dim_gate: nn.Parameter | None = None
        self.reset_parameters(seed)

    def reset_parameters(self, seed: int | None = None) -> None:
        gen = None
        if seed is not None:
            gen = torch.Generator().manual_seed(seed)
        if self.dense is not None:
            self.dense.reset_parameters(gen)
        self.sparse.reset_parameters(gen)
        self.over.reset_parameters(gen)

    def enable_dim_gate(self) -> nn.Parameter:
        """Add a (D,) gate multiplying every interaction vector (`dot` only): the group handle for
        embedding-dimension pruning, so that no step has to scan the tables. Folded away on extraction."""
        if self.structure.interaction != "dot":
            raise ValueError("a shared dimension gate only exists under `dot` interaction")
        if self.dim_gate is None:
            device = next(self.parameters()).device
            self.dim_gate = nn.Parameter(torch.ones(self.structure.dim, device=device))
        return self.dim_gate

    def forward(self, dense: Tensor, sparse: Tensor) -> Tensor:
        bottom_out = self.dense(dense) if self.dense is not None else None
        embeddings = self.sparse(sparse)
        return self.over(self.interaction(bottom_out, embeddings, self.dim_gate)).squeeze(1)

    def linear_layers(self) -> dict[str, nn.Linear]:
        """Every Linear by its stable name."""
        out = {}
        if self.dense is not None:
            out.update({f"dense.layers.{i}": m for i, m in enumerate(self.dense.layers)})
        out.update({f"over.layers.{i}": m for i, m in enumerate(self.over.layers)})
        return out
