"""Wide & Deep (Cheng et al. 2016): a wide linear model and a deep network, their logits summed.

    wide  = Σ_f w_f[id_f] + wide(dense)                    first-order weight per category; Linear N → 1 (+ bias)
    x     = cat(dense (B, N) iff use_dense, e_1 (B, D_1), …, e_F (B, D_F))      (B, W),  W = N + Σ D_f
    logit = head(deep(x)) + wide                            deep: ReLU layers of widths `deep`; head: → 1

Every table keeps the feature's first-order weight as ONE EXTRA COLUMN: table f is (rows_f, D_f + 1), its lookup's
first D_f columns are e_f and its last is w_f[id_f]. So every table stays in `SparseArch` (grouped by stored width
D_f + 1, sharded as DLRM's, with sparse gradients) and the wide part costs no lookup of its own. D_f may be 0 (a
compressed table that kept only its wide weight).

Per-sample cost (`models.cost.measure`): the deep Linears, the head and the wide dense Linear (2·in·out + out FLOPs);
tables rows·(D_f + 1) parameters and 0 FLOPs; the sum of the F wide weights is not counted (as ReLU is not); the
compression gate (below), while there is one, its ud + F parameters.

While compressing (`enable_dim_gate`, called by the group sets of the feature kind) the model carries one gate
vector `dim_gate` = [g_dense (iff use_dense), g_1 … g_F]: the dense block is multiplied by g_dense (before the deep
network and the wide Linear alike), feature f's whole lookup (its D_f embedding columns and its wide weight) by g_f.
Zeroing g_f removes feature f exactly, its first-order weights included, without any step reading a table; the
surgery folds the gate into the tables and the dense block's weights, so an extracted model has none. One parameter
under DLRM's name, so that the shared code that restores, strips or refuses "the dim gate" (compressed.pt, the stage
hand-off, `fold_batch_norm`, latency) handles it as it is. Without a gate the model is the formula above.

Its compression parts: group sets and the structure masks leave (`wdl_groups.py`), the resource model
(`wdl_resources.py`), the surgery (`wdl_surgery.py`), which also factorises (the low-rank and mixed-dimension
methods): a table's looked-up vector (its D_f embedding columns and the wide weight, D_f + 1) stored at rank
r < D_f + 1 and projected back to D_f + 1 (`table_ranks`, `SparseArch`'s projection), a deep layer stored as a
`Factored` in -> r -> out (`layer_ranks`). The head and the wide Linear (N -> 1) are never factorised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .deep_structure import DeepStructure, LookupView, dense_config_args, dense_deep_fields
from .dlrm import MLP, Factored, InitScheme, SparseArch, _init_linear
from .family import DeepModelConfig, PartsFamily, config_errors
from .tables import TablesOfRecord


@dataclass
class WDLStructure(DeepStructure):
    """Everything needed to build a Wide & Deep model's modules (weights aside).

    sparse_names, feature_ids, table_sizes: as `DLRMStructure`'s (one table per kept feature).
    table_dims:   the embedding width D_f of each table (>= 0), the deep network's share; stored width D_f + 1.
    num_dense:    width of the dense input, read (by the deep network and the wide Linear) iff `use_dense`.
    deep:         output widths of the deep layers (ReLU after each); empty: the head reads x directly.
    batch_norm, dropout: of the deep layers, by stable name (`deep.layers.<i>`), as `DLRMStructure`'s.
    table_ranks, projection_bias, layer_ranks, factor_activation: the factorisation, as `DLRMStructure`'s
                  (`deep_structure`): a table stored at rank r_f < D_f + 1 with a projection r_f -> D_f + 1 (its
                  whole looked-up vector, wide weight included); deep layers stored factored in -> r -> out.
    """

    sparse_names: list[str]
    feature_ids: list[int]
    table_sizes: list[int]
    table_dims: list[int]
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
    family: str = field(default="wdl", init=False)

    interaction = "wide"
    lookup_extra = 1  # a looked-up vector: the D_f embedding columns, then the wide weight

    @property
    def width(self) -> int:
        """W, the width of the deep network's input x."""
        return (self.num_dense if self.use_dense else 0) + sum(self.table_dims)

    @property
    def deep_in(self) -> int:
        return self.width

    @property
    def head_in(self) -> int:
        return self.deep[-1] if self.deep else self.width

    def validate(self) -> None:
        n = len(self.feature_ids)
        if len(self.table_sizes) != n or len(self.table_dims) != n:
            raise ValueError("feature_ids, table_sizes and table_dims must be parallel lists")
        if any(d < 0 for d in self.table_dims):
            raise ValueError(f"table widths must be >= 0, got {self.table_dims}")
        if self.num_dense < 0:
            raise ValueError(f"num_dense must be >= 0, got {self.num_dense}")
        if self.use_dense and self.num_dense == 0:
            raise ValueError("use_dense without dense features (num_dense 0)")
        if not self.use_dense and n == 0:
            raise ValueError("a Wide & Deep model needs an input: no dense features and no tables")
        self.validate_deep()



class WDL(TablesOfRecord, nn.Module):
    """Wide & Deep: dense (B, N) and sparse (B, S) inputs -> logits (B,). The same table and checkpoint interface
    as `DLRM` (`sparse`, `holds_tables`, `table_keys`, `linear_layers`, `dim_gate`, ...)."""

    def __init__(self, structure: WDLStructure, sparse_grad: bool = True, seed: int | None = None,
                 hold_tables: bool = True, init: InitScheme | None = None):
        super().__init__()
        self.structure = structure
        self.sparse = SparseArch(LookupView(structure), sparse_grad=sparse_grad, hold_tables=hold_tables)
        # The dense block as a module: what reads or replaces it (held-out ablation, the collapse guard) hooks its
        # output, which both the deep network and the wide Linear read.
        self.dense = nn.Identity() if structure.use_dense else None
        self.wide = nn.Linear(structure.num_dense, 1) if structure.use_dense else None
        names = structure.hidden_names
        self.deep = None
        if structure.deep:
            self.deep = MLP(structure.width, structure.deep, relu_last=True,
                            ranks=[structure.layer_rank(n) for n in names],
                            factor_activation=structure.factor_activation,
                            batch_norm=[structure.has_batch_norm(n) for n in names],
                            dropout=[structure.dropout_of(n) for n in names])
        self.head = nn.Linear(structure.head_in, 1)
        # Columns of the concatenated lookups (B, Σ (D_f + 1)): the embeddings' (x, in order), the wide weights',
        # and the feature each column belongs to (the gate entry that scales it).
        deep_cols, wide_cols, col_feature, col = [], [], [], 0
        for f, d in enumerate(structure.table_dims):
            deep_cols += range(col, col + d)
            wide_cols.append(col + d)
            col_feature += [f] * (d + 1)
            col += d + 1
        self.register_buffer("deep_cols", torch.tensor(deep_cols, dtype=torch.long), persistent=False)
        self.register_buffer("wide_cols", torch.tensor(wide_cols, dtype=torch.long), persistent=False)
        self.register_buffer("col_feature", torch.tensor(col_feature, dtype=torch.long), persistent=False)
        self.ud = int(structure.use_dense)
        self.num_tables = structure.num_features
        self.dim_gate: nn.Parameter | None = None  # the compression gate (module docstring), while compressing
        self.reset_parameters(seed, init)

    def reset_parameters(self, seed: int | None = None, init: InitScheme | None = None) -> None:
        """Every weight from one generator seeded by `seed`, the tables last (as `DLRM.reset_parameters`): the deep
        layers, the head, the wide Linear (the reference Linear init), then the tables (embeddings and wide weights
        alike)."""
        init = init or InitScheme()
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        if self.deep is not None:
            self.deep.reset_parameters(gen, init.zero_bias)
        _init_linear(self.head, gen, init.zero_bias)
        if self.wide is not None:
            _init_linear(self.wide, gen, init.zero_bias)
        self.sparse.reset_projections(gen)
        self.sparse.reset_tables(gen, init.embedding_std)

    def enable_dim_gate(self) -> nn.Parameter:
        """Add the compression gate (ones, ud + F): [dense block (iff read), every feature] (module docstring). The
        group handle of the features, so that no step scans a table; folded away on extraction."""
        if self.dim_gate is None:
            device = self.head.weight.device  # not a table's: those may be meta
            self.dim_gate = nn.Parameter(torch.ones(self.ud + self.num_tables, device=device))
        return self.dim_gate

    def forward(self, dense: Tensor, sparse: Tensor) -> Tensor:
        gate = self.dim_gate
        parts = self.sparse(sparse)
        inputs: list[Tensor] = []
        wide: list[Tensor] = []
        if self.dense is not None and self.wide is not None:
            d = self.dense(dense)
            if gate is not None:
                d = d * gate[0]
            inputs.append(d)
            wide.append(self.wide(d))
        if len(parts) > 0:
            looked = torch.cat(parts, dim=1)
            if gate is not None:
                looked = looked * gate[self.ud:].index_select(0, self.col_feature)
            inputs.append(looked.index_select(1, self.deep_cols))
            wide.append(looked.index_select(1, self.wide_cols).sum(1, keepdim=True))
        x = torch.cat(inputs, dim=1)
        out = self.head(x if self.deep is None else self.deep(x))
        for w in wide:
            out = out + w
        return out.squeeze(1)

    def linear_layers(self) -> dict[str, nn.Linear | Factored]:
        """Every Linear by its module path: the deep network's (a `Factored` for a layer of
        `structure.layer_ranks`), the head, the wide Linear on the dense block."""
        out = {} if self.deep is None else {f"deep.layers.{i}": m for i, m in enumerate(self.deep.layers)}
        out["head"] = self.head
        if self.wide is not None:
            out["wide"] = self.wide
        return out

    def neuron_layers(self) -> dict[str, nn.Linear]:
        """The layers whose outputs are neurons (`Kept.neurons`): the deep network's."""
        return {} if self.deep is None else {f"deep.layers.{i}": m for i, m in enumerate(self.deep.layers)}

    def batch_norms(self) -> dict[str, nn.BatchNorm1d]:
        if self.deep is None:
            return {}
        return {f"deep.layers.{i}": m for i, m in enumerate(self.deep.norms) if isinstance(m, nn.BatchNorm1d)}

    def factored_layers(self) -> dict[str, Factored]:
        """The factored layers (those of `structure.layer_ranks`) by their stable names."""
        return {name: m for name, m in self.linear_layers().items() if isinstance(m, Factored)}

    def interaction_flops(self) -> int:
        return 0  # the wide sum is not counted; every multiply-add is in a Linear

    def extra_params(self) -> int:
        """Parameters outside Linears and tables: the compression gate while compressing (the wide weights are
        table columns, counted with the tables; the wide bias is the wide Linear's)."""
        return 0 if self.dim_gate is None else self.dim_gate.numel()


def dense_wdl_structure(sparse_names: list[str], table_sizes: list[int], embedding_dim: int, num_dense: int,
                        deep: list[int], dense_names: list[str] | None = None, batch_norm=None,
                        dropout=None) -> WDLStructure:
    """The dense Wide & Deep model over every feature of the data (one table each, `embedding_dim` + 1 wide)."""
    return WDLStructure(
        table_dims=[embedding_dim] * len(sparse_names),
        **dense_deep_fields(sparse_names, table_sizes, num_dense, deep, dense_names, batch_norm, dropout))


@dataclass(kw_only=True)
class WDLConfig(DeepModelConfig):
    """What `model` admits for model=wdl (read by `config.validate_config`): the shared keys."""


class WDLFamily(PartsFamily):
    name = "wdl"
    resource_model_class = "WDLResourceModel"
    config_schema = WDLConfig
    structure_type = WDLStructure
    model_type = WDL

    def dense_structure(self, model_cfg, meta) -> WDLStructure:
        with config_errors():
            return dense_wdl_structure(**dense_config_args(model_cfg, meta))


FAMILY = WDLFamily()
