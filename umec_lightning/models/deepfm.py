"""DeepFM (Guo et al. 2017): a first-order term, a factorisation machine and a deep network over the same tables.

    lookup of feature f:  v_f = table_f[id_f]  (B, D + 1): e_f = v_f[:, :D] its embedding, w_f = v_f[:, D] its
                          first-order weight (one extra column of the table: every table stays in `SparseArch`,
                          sharded and sparse-gradient as DLRM's)
    first order:          Σ_f w_f + first_order(dense)                     Linear N -> 1 with bias (iff use_dense)
    FM (second order):    0.5·Σ_k [(Σ_f e_{f,k})² − Σ_f e_{f,k}²]          all tables D wide: one shared width
    deep:                 head(MLP(x)),  x = cat([dense] (iff use_dense) + [e_1 … e_F])   (B, N + F·D)
    logit = first order + FM + deep

Per-sample cost (`models.cost.measure`): every Linear 2·in·out + out FLOPs (the first-order Linear, the deep
layers, the head); tables 0 FLOPs and rows·(D + 1) params; the FM counted in `interaction_flops()` as
3·F·D + D (per dim k: F − 1 adds for Σ_f e, F squares and F − 1 adds for Σ_f e², one square and one subtract;
then D − 1 adds over k and the ½: 3·F·D + D, rounded to that convention), 0 without tables. The first-order sum
over the tables, the three-term sum and ReLU are not counted (element-wise, as DCNv2's ⊙ and +).

While compressing (`enable_dim_gate`, called by the group sets of the feature or dim kinds) the model carries one
gate vector `dim_gate` = [g_dense (iff use_dense), g_1 … g_F, γ_1 … γ_D]: the dense block is multiplied by
g_dense, feature f's whole lookup by g_f and its embedding's column k by γ_k (before the FM, the deep network and
the first-order sum alike). Zeroing g_f removes feature f exactly (the FM reads its table too, so deep columns alone
could not), zeroing γ_k removes the shared dim k exactly; the surgery folds the gate into the tables and the
dense block's weights, so an extracted model has none. One parameter under DLRM's name, so that the shared code
that restores, strips or refuses "the dim gate" (compressed.pt, the stage hand-off, `fold_batch_norm`, latency)
handles it as it is.

Its compression parts: group sets and the structure masks leave (`deepfm_groups.py`), the resource model
(`deepfm_resources.py`), the surgery (`deepfm_surgery.py`), which also factorises (the low-rank and mixed-dimension
methods): a table's looked-up vector (its D embedding columns and the first-order weight, D + 1) stored at rank
r < D + 1 and projected back to D + 1 (`table_ranks`, `SparseArch`'s projection: the FM needs every embedding D
wide), a deep layer stored as a `Factored` in -> r -> out (`layer_ranks`). The head and the first-order Linear
(N -> 1) are never factorised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .deep_structure import DeepStructure, LookupView, dense_config_args, dense_deep_fields
from .dlrm import MLP, Factored, InitScheme, SparseArch, _init_linear, input_linear
from .family import DeepModelConfig, PartsFamily, config_errors
from .tables import TablesOfRecord


@dataclass
class DeepFMStructure(DeepStructure):
    """Everything needed to build a DeepFM's modules (weights aside).

    sparse_names, feature_ids, table_sizes: as `DLRMStructure`'s (one table per kept feature).
    embedding_dim: D, the shared width of every embedding (a table stores D + 1 columns: the last is the
                   feature's first-order weight).
    num_dense:     width of the dense input, read iff `use_dense` (by the first-order Linear and the deep network).
    deep:          output widths of the deep network's layers (ReLU after each); empty: the head reads x itself.
    batch_norm, dropout: of the deep layers, by stable name (`deep.layers.<i>`), as `DLRMStructure`'s.
    table_ranks, projection_bias, layer_ranks, factor_activation: the factorisation, as `DLRMStructure`'s
                   (`deep_structure`): a table stored at rank r_f < D + 1 with a projection r_f -> D + 1 (its whole
                   looked-up vector, first-order weight included); deep layers stored factored in -> r -> out.
    """

    sparse_names: list[str]
    feature_ids: list[int]
    table_sizes: list[int]
    embedding_dim: int
    num_dense: int
    deep: list[int]
    use_dense: bool = True
    dense_names: list[str] | None = None
    batch_norm: list[str] | None = None
    dropout: dict[str, float] | None = None
    table_ranks: list[int] | None = None
    projection_bias: bool = False
    layer_ranks: dict[str, int] | None = None
    factor_activation: bool = False
    family: str = field(default="deepfm", init=False)

    interaction = "fm"
    lookup_extra = 1  # a looked-up vector: the D embedding columns, then the first-order weight

    @property
    def dim(self) -> int:
        return self.embedding_dim

    @property
    def table_dims(self) -> list[int]:
        """Every table's embedding width (what `Kept.dims` indexes): D, the first-order column aside."""
        return [self.embedding_dim] * len(self.feature_ids)

    @property
    def deep_in(self) -> int:
        """Width of x, the deep network's input: the dense block (iff read) and every embedding."""
        return (self.num_dense if self.use_dense else 0) + self.embedding_dim * len(self.feature_ids)

    @property
    def head_in(self) -> int:
        return self.deep[-1] if self.deep else self.deep_in

    def validate(self) -> None:
        if len(self.table_sizes) != len(self.feature_ids):
            raise ValueError("feature_ids and table_sizes must be parallel lists")
        if self.embedding_dim < 1:
            raise ValueError(f"config key `model.embedding_dim` must be >= 1, got {self.embedding_dim}")
        if self.use_dense and self.num_dense < 1:
            raise ValueError("use_dense needs num_dense >= 1")
        if self.deep_in == 0:
            raise ValueError("a DeepFM needs an input: no dense features and no tables")
        self.validate_deep()



class DeepFM(TablesOfRecord, nn.Module):
    """DeepFM: dense (B, N) and sparse (B, S) inputs -> logits (B,). The same table and checkpoint interface as
    `DLRM` (`sparse`, `holds_tables`, `table_keys`, `linear_layers`, `dim_gate`, ...)."""

    def __init__(self, structure: DeepFMStructure, sparse_grad: bool = True, seed: int | None = None,
                 hold_tables: bool = True, init: InitScheme | None = None):
        super().__init__()
        self.structure = structure
        self.dim = structure.embedding_dim
        self.num_tables = structure.num_features
        self.ud = int(structure.use_dense)
        self.sparse = SparseArch(LookupView(structure), sparse_grad=sparse_grad, hold_tables=hold_tables)
        # The dense block as a module: what reads or replaces it (held-out ablation, the collapse guard) hooks
        # its output, as DLRM's bottom MLP's.
        self.dense = nn.Identity() if structure.use_dense else None
        self.first_order = nn.Linear(structure.num_dense, 1) if structure.use_dense else None
        names = structure.hidden_names
        self.deep = None
        if structure.deep:
            self.deep = MLP(structure.deep_in, structure.deep, relu_last=True,
                            ranks=[structure.layer_rank(n) for n in names],
                            factor_activation=structure.factor_activation,
                            batch_norm=[structure.has_batch_norm(n) for n in names],
                            dropout=[structure.dropout_of(n) for n in names])
        self.head = nn.Linear(structure.head_in, 1)
        self.dim_gate: nn.Parameter | None = None
        self.reset_parameters(seed, init)

    def reset_parameters(self, seed: int | None = None, init: InitScheme | None = None) -> None:
        """Every weight from one generator seeded by `seed`, the tables last (as `DLRM.reset_parameters`): the
        first-order Linear, the deep network and the head with the reference Linear init; then the tables (their
        first-order column drawn with the rest of the row)."""
        init = init or InitScheme()
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        if self.first_order is not None:
            _init_linear(self.first_order, gen, init.zero_bias)
        if self.deep is not None:
            self.deep.reset_parameters(gen, init.zero_bias)
        _init_linear(self.head, gen, init.zero_bias)
        self.sparse.reset_projections(gen)  # none unless factorised: draws nothing then
        self.sparse.reset_tables(gen, init.embedding_std)

    def enable_dim_gate(self) -> nn.Parameter:
        """Add the compression gate (ones, ud + F + D): [dense block (iff read), every feature, every shared dim]
        (module docstring). The group handle of features and dims, so that no step scans a table; folded away
        on extraction."""
        if self.dim_gate is None:
            device = self.head.weight.device  # not a table's: those may be meta
            self.dim_gate = nn.Parameter(torch.ones(self.ud + self.num_tables + self.dim, device=device))
        return self.dim_gate

    def forward(self, dense: Tensor, sparse: Tensor) -> Tensor:
        gate = self.dim_gate
        parts: list[Tensor] = []
        first = self.head.weight.new_zeros(sparse.shape[0])
        fm = self.head.weight.new_zeros(sparse.shape[0])
        if self.dense is not None and self.first_order is not None:
            d = self.dense(dense)
            if gate is not None:
                d = d * gate[0]
            parts.append(d)
            first = self.first_order(d).squeeze(1)
        if self.num_tables > 0:
            v = torch.stack(self.sparse(sparse), dim=1)  # (B, F, D + 1)
            if gate is not None:
                g = gate[self.ud: self.ud + self.num_tables].unsqueeze(1)  # (F, 1)
                dims = gate[self.ud + self.num_tables:].unsqueeze(0)  # (1, D)
                v = v * torch.cat([g * dims, g], dim=1)
            e = v[:, :, : self.dim]  # (B, F, D)
            first = first + v[:, :, self.dim].sum(1)
            total = e.sum(1)
            fm = 0.5 * (total * total - (e * e).sum(1)).sum(1)
            parts.append(e.reshape(e.shape[0], self.num_tables * self.dim))
        x = torch.cat(parts, dim=1)
        h = x if self.deep is None else self.deep(x)
        return first + fm + self.head(h).squeeze(1)

    def linear_layers(self) -> dict[str, nn.Linear | Factored]:
        """Every Linear by its module path: the first-order one (iff the dense block is read), the deep
        network's (a `Factored` for a layer of `structure.layer_ranks`), the head."""
        out = {} if self.first_order is None else {"first_order": self.first_order}
        if self.deep is not None:
            out.update({f"deep.layers.{i}": m for i, m in enumerate(self.deep.layers)})
        out["head"] = self.head
        return out

    def neuron_layers(self) -> dict[str, nn.Linear]:
        """The layers whose outputs are neurons (`Kept.neurons`): the deep network's."""
        return {} if self.deep is None else {f"deep.layers.{i}": m for i, m in enumerate(self.deep.layers)}

    def x_reader(self) -> nn.Linear:
        """The Linear that reads x (its columns are x's positions): deep layer 0 (its first factor when factored),
        or the head without one."""
        return self.head if self.deep is None else input_linear(self.deep.layers[0])

    def batch_norms(self) -> dict[str, nn.BatchNorm1d]:
        if self.deep is None:
            return {}
        return {f"deep.layers.{i}": m for i, m in enumerate(self.deep.norms) if isinstance(m, nn.BatchNorm1d)}

    def factored_layers(self) -> dict[str, Factored]:
        """The factored layers (those of `structure.layer_ranks`) by their stable names."""
        return {name: m for name, m in self.linear_layers().items() if isinstance(m, Factored)}

    def interaction_flops(self) -> int:
        """The FM's per-sample FLOPs, 3·F·D + D (module docstring); 0 without tables."""
        return fm_flops(self.num_tables, self.dim)

    def extra_params(self) -> int:
        """Parameters outside Linears and tables: the compression gate while compressing."""
        return 0 if self.dim_gate is None else self.dim_gate.numel()


def fm_flops(num_tables: int, dim: int) -> int:
    """The FM's cost convention: 3·F·D + D per sample, 0 without tables (module docstring)."""
    return 3 * num_tables * dim + dim if num_tables > 0 else 0


def dense_deepfm_structure(sparse_names: list[str], table_sizes: list[int], embedding_dim: int, num_dense: int,
                           deep: list[int], dense_names: list[str] | None = None, batch_norm=None,
                           dropout=None) -> DeepFMStructure:
    """The dense DeepFM over every feature of the data (one table each)."""
    return DeepFMStructure(
        embedding_dim=embedding_dim,
        **dense_deep_fields(sparse_names, table_sizes, num_dense, deep, dense_names, batch_norm, dropout))


@dataclass(kw_only=True)
class DeepFMConfig(DeepModelConfig):
    """What `model` admits for model=deepfm (read by `config.validate_config`): the shared keys."""


class DeepFMFamily(PartsFamily):
    name = "deepfm"
    resource_model_class = "DeepFMResourceModel"
    config_schema = DeepFMConfig
    structure_type = DeepFMStructure
    model_type = DeepFM

    def dense_structure(self, model_cfg, meta) -> DeepFMStructure:
        with config_errors():
            return dense_deepfm_structure(**dense_config_args(model_cfg, meta))


FAMILY = DeepFMFamily()
