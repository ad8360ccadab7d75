"""DLRM (Naumov et al. 2019), faithful to facebookresearch/dlrm, built from a `DLRMStructure`.

Shape letters: B batch, N dense inputs (13 for Criteo), S sparse inputs of the data (26 for Criteo),
F kept sparse features (tables), D embedding dim (`dot`), P kept interaction pairs.

Stable names (what compression addresses):
  sparse.tables[<feature name>]   one nn.Embedding per kept sparse feature, keyed by its name ("C1"...),
                                  stored at the table's rank r_f (its full width when not projected)
  sparse.projections[<name>]      Linear(r_f, d_f), only for tables with r_f < d_f; bias iff
                                  `structure.projection_bias`
  dense.layers.<i>                bottom-MLP Linear layers (ReLU after every one, the last too)
  over.layers.<i>                 top-MLP Linear layers (ReLU after all but the last, which gives the logit)
  <layer>.first / <layer>.second  the two factors of a layer named in `structure.layer_ranks` (a `Factored`
                                  module in place of the Linear): Linear(in, r) then Linear(r, out)
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
    """Linear(r, d) after a table stored at rank r < d, bias-free unless `bias`. `position` is the table's
    index in SparseArch's output list (an int attribute: TorchScript scripts it, unlike an empty dict)."""

    def __init__(self, rank: int, dim: int, position: int, bias: bool = False):
        super().__init__(rank, dim, bias=bias)
        self.position = position


class Factored(nn.Module):
    """A low-rank Linear in -> out stored as `first` = Linear(in, r) then `second` = Linear(r, out), both
    with bias; a ReLU between them iff `activation`. Exposes in_features, out_features and rank like a
    Linear's shape, but no `weight`: code that reads a layer's weight must handle the two factors."""

    def __init__(self, in_features: int, rank: int, out_features: int, activation: bool = False):
        super().__init__()
        self.first = nn.Linear(in_features, rank)
        self.second = nn.Linear(rank, out_features)
        self.activation = activation
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank

    def forward(self, x: Tensor) -> Tensor:
        x = self.first(x)
        if self.activation:
            x = torch.relu(x)
        return self.second(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.rank}, out_features={self.out_features}, " \
               f"activation={self.activation}"


def input_linear(layer: nn.Module) -> nn.Linear:
    """The Linear that reads a layer's input: the layer itself, or a `Factored` layer's `first`."""
    return layer.first if isinstance(layer, Factored) else layer


def output_linear(layer: nn.Module) -> nn.Linear:
    """The Linear that writes a layer's output: the layer itself, or a `Factored` layer's `second`."""
    return layer.second if isinstance(layer, Factored) else layer


class SparseArch(nn.Module):
    """Embedding lookups: sparse ids (B, S) -> list of F vectors (B, D_f), one id per sample per table.

    A table stored at rank r_f < D_f looks up (B, r_f) and projects it to (B, D_f) with its own Linear.
    """

    def __init__(self, structure: DLRMStructure, sparse_grad: bool = True):
        super().__init__()
        self.feature_names = structure.feature_names
        self.tables = nn.ModuleDict(
            {
                name: nn.Embedding(rows, rank, sparse=sparse_grad)
                for name, rows, rank in zip(self.feature_names, structure.table_sizes, structure.stored_dims)
            }
        )
        self.projections = nn.ModuleDict(
            {
                self.feature_names[f]: Projection(structure.stored_dims[f], structure.table_dims[f], f,
                                                  bias=structure.projection_bias)
                for f in structure.projected()
            }
        )
        # Which column of the data's sparse block feeds each table; derived, so not checkpointed.
        self.register_buffer(
            "feature_ids", torch.tensor(structure.feature_ids, dtype=torch.long), persistent=False
        )

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Tables ~ U(±sqrt(1/rows)) (reference); projections like the reference Linear, N(0, sqrt(2/(in+out)))
        (a projection bias starts at 0)."""
        with torch.no_grad():
            for table in self.tables.values():
                bound = math.sqrt(1.0 / table.num_embeddings)
                table.weight.uniform_(-bound, bound, generator=generator)
            for projection in self.projections.values():
                fan_out, fan_in = projection.weight.shape
                projection.weight.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)), generator=generator)
                if projection.bias is not None:
                    projection.bias.zero_()

    def forward(self, sparse: Tensor) -> list[Tensor]:
        # One id per sample per table: each table is an nn.Embedding on one contiguous row of a (F, B) id
        # block. An EmbeddingBag on a (B, 1) column view (what this was) built offsets and reshaped on every
        # call, and its sparse backward did per-bag work: lookup + backward + SGD of the 26 Kaggle tables
        # costs about half of that now (bench/embedding_lookup.py; README, Performance).
        ids = sparse.t().index_select(0, self.feature_ids)  # (F, B), contiguous
        out = [table(ids[k]) for k, table in enumerate(self.tables.values())]
        for projection in self.projections.values():  # empty for a model without projections
            out[projection.position] = projection(out[projection.position])
        return out


class MLP(nn.Module):
    """Stack of Linear layers: (B, in) -> (B, widths[-1]). ReLU after every layer, or all but the last.

    `ranks[i]` (optional, None entries: plain) stores layer i as a `Factored` in -> r -> out (ReLU between
    the factors iff `factor_activation`)."""

    def __init__(self, in_features: int, widths: list[int], relu_last: bool,
                 ranks: list[int | None] | None = None, factor_activation: bool = False):
        super().__init__()
        sizes = [in_features, *widths]
        ranks = ranks or [None] * len(widths)
        self.layers = nn.ModuleList(
            nn.Linear(a, b) if r is None else Factored(a, r, b, activation=factor_activation)
            for a, b, r in zip(sizes[:-1], sizes[1:], ranks)
        )
        self.relu_last = relu_last

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for layer in self.layers:
            if isinstance(layer, Factored):
                _init_linear(layer.first, generator)
                _init_linear(layer.second, generator)
            else:
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
        act = structure.factor_activation
        self.dense = None
        if structure.use_dense:
            ranks = [structure.layer_rank(f"dense.layers.{i}") for i in range(len(structure.bottom))]
            self.dense = MLP(structure.num_dense, structure.bottom, relu_last=True, ranks=ranks,
                             factor_activation=act)
        self.interaction = InteractionArch(structure)
        ranks = [structure.layer_rank(f"over.layers.{i}") for i in range(len(structure.top))]
        self.over = MLP(structure.interaction_out, structure.top, relu_last=False, ranks=ranks,
                        factor_activation=act)
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

    def linear_layers(self) -> dict[str, nn.Linear | Factored]:
        """Every MLP layer by its stable name: an nn.Linear, or a `Factored` for a layer named in
        `structure.layer_ranks` (same in_features/out_features, no `weight`: see `input_linear`,
        `output_linear`)."""
        out = {}
        if self.dense is not None:
            out.update({f"dense.layers.{i}": m for i, m in enumerate(self.dense.layers)})
        out.update({f"over.layers.{i}": m for i, m in enumerate(self.over.layers)})
        return out

    def factored_layers(self) -> dict[str, Factored]:
        """The factored layers (those of `structure.layer_ranks`) by their stable names."""
        return {name: m for name, m in self.linear_layers().items() if isinstance(m, Factored)}
