"""DCNv2 (Wang et al. 2021, "DCN V2"): a cross network and a deep network over x0 = [dense, e_1 … e_F].

    x0 = cat(dense (B, N), e_1 (B, D_1), …, e_F (B, D_F))                       (B, W),  W = N + Σ D_f
    cross layer l, full rank:      x_{l+1} = x0 ⊙ (W_l x_l + b_l) + x_l          W_l (W, W)
    cross layer l, low-rank mixture (DCN-Mix, `cross_rank` r, `experts` K):
        E_k(x_l) = x0 ⊙ (U_k tanh(C_k tanh(V_kᵀ x_l)) + b_l),   x_{l+1} = Σ_k softmax_k(g_k(x_l)) E_k(x_l) + x_l
                                                                  V_k (W→r), C_k (r→r), U_k (r→W), g_k (W→1)
    parallel: logit = head(cat(cross(x0), deep(x0)));  stacked: logit = head(deep(cross(x0)))

The dense features enter x0 through a batch norm (`dense_norm: batch`, the default) or as they are (`none`,
DCN's original input): the cross layers multiply x0 by itself, so raw log-transformed values (up to about 12 on
Criteo) make the logit a degree-(L+1) polynomial of them and plain SGD at lr 0.1 diverges within a few steps
(docs/models.md). The tables are the same `SparseArch` as DLRM's.

Per-sample cost (`models.cost.measure`): every Linear, 2·in·out (+ out with a bias) FLOPs; the element-wise ⊙, +,
tanh and softmax are not counted, as ReLU is not. A cross matrix is W×W, so the cross cost falls quadratically
with the kept width of x0.

Its compression parts: group sets and the structure masks leave (`dcnv2_groups.py`), the resource model
(`dcnv2_resources.py`), the surgery (`dcnv2_surgery.py`), which also factorises (the low-rank and mixed-dimension
methods): a table stored at rank r < D_f and projected back to D_f (`table_ranks`, `SparseArch`'s projection), a deep
layer or a full-rank cross matrix `cross.layers.<i>.linear` stored as a `Factored` in -> r -> out (`layer_ranks`).
The head is never factorised, nor are a mixture layer's V, C, U and gates (low rank already).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..schema import spec
from .deep_structure import DeepStructure, LookupView, dense_config_args, dense_deep_fields
from .dlrm import MLP, Factored, InitScheme, SparseArch, _init_linear
from .family import DeepModelConfig, PartsFamily, config_errors
from .tables import TablesOfRecord

STACKINGS = ("parallel", "stacked")
DENSE_NORMS = ("batch", "none")


@dataclass
class DCNv2Structure(DeepStructure):
    """Everything needed to build a DCNv2's modules (weights aside).

    sparse_names, feature_ids, table_sizes, table_dims: as `DLRMStructure`'s (tables, one per kept feature).
    num_dense:    width of the dense input, read iff `use_dense`.
    deep:         output widths of the deep network's layers (ReLU after each); empty: the cross network alone.
    cross_layers: number of cross layers (>= 0).
    cross_rank:   None: full-rank cross matrices; r: the low-rank mixture of `experts` experts of rank r.
    stacking:     `parallel` (cross ‖ deep on x0) or `stacked` (deep on the cross network's output).
    batch_norm, dropout: of the deep layers, by stable name (`deep.layers.<i>`), as `DLRMStructure`'s.
    dense_norm:   `batch` (a BatchNorm1d over the dense block before x0) or `none` (the raw values). A structure
                  saved without the key was built raw, hence the dataclass default; the config's is `batch`.
    table_ranks, projection_bias, layer_ranks, factor_activation: the factorisation, as `DLRMStructure`'s
                  (`deep_structure`): tables stored at rank r_f < D_f with a projection r_f -> D_f; deep layers and
                  full-rank cross matrices (`cross.layers.<i>.linear`) stored factored in -> r -> out.
    """

    sparse_names: list[str]
    feature_ids: list[int]
    table_sizes: list[int]
    table_dims: list[int]
    num_dense: int
    deep: list[int]
    cross_layers: int = 3
    cross_rank: int | None = None
    experts: int = 1
    stacking: str = "parallel"
    use_dense: bool = True
    dense_names: list[str] | None = None
    batch_norm: list[str] | None = None
    dropout: dict[str, float] | None = None
    dense_norm: str = "none"
    table_ranks: list[int] | None = None
    projection_bias: bool = False
    layer_ranks: dict[str, int] | None = None
    factor_activation: bool = False
    family: str = field(default="dcnv2", init=False)

    interaction = "cross"  # the rest `SparseArch` reads: `DeepStructure`'s

    @property
    def width(self) -> int:
        """W, the width of x0 and of every cross layer."""
        return (self.num_dense if self.use_dense else 0) + sum(self.table_dims)

    @property
    def deep_in(self) -> int:
        """The deep network reads x0 (parallel) or the cross network's output (stacked): both W wide."""
        return self.width

    def extra_linear_shapes(self) -> dict[str, tuple[int, int]]:
        """The full-rank cross matrices, W -> W (a mixture layer's parts are low rank already: not factorisable)."""
        if self.cross_rank is not None:
            return {}
        return {f"cross.layers.{i}.linear": (self.width, self.width) for i in range(self.cross_layers)}

    @property
    def head_in(self) -> int:
        if self.stacking == "stacked" or self.cross_layers == 0:
            return self.deep[-1] if self.deep else self.width
        return self.width + (self.deep[-1] if self.deep else 0)

    @property
    def dense_norm_params(self) -> int:
        """Parameters of the dense block's norm as served: its per-column scale and shift (the running statistics
        fold into them in eval mode), 0 without a norm or a dense block."""
        return 2 * self.num_dense if self.use_dense and self.dense_norm == "batch" else 0

    def validate(self) -> None:
        n = len(self.feature_ids)
        if len(self.table_sizes) != n or len(self.table_dims) != n:
            raise ValueError("feature_ids, table_sizes and table_dims must be parallel lists")
        if self.stacking not in STACKINGS:
            raise ValueError(f"config key `model.stacking` must be one of {', '.join(STACKINGS)}, "
                             f"got {self.stacking!r}")
        if self.dense_norm not in DENSE_NORMS:
            raise ValueError(f"config key `model.dense_norm` must be one of {', '.join(DENSE_NORMS)}, "
                             f"got {self.dense_norm!r}")
        if self.cross_layers < 0:
            raise ValueError(f"config key `model.cross_layers` must be an integer >= 0, got {self.cross_layers}")
        if self.cross_rank is not None and not 1 <= self.cross_rank:
            raise ValueError(f"config key `model.cross_rank` must be null (full rank) or >= 1, got {self.cross_rank}")
        if self.experts < 1:
            raise ValueError(f"config key `model.experts` must be >= 1, got {self.experts}")
        if self.cross_layers == 0 and not self.deep:
            raise ValueError("config keys `model.cross_layers` and `model.deep`: the model needs a cross layer or a "
                             "deep layer")
        if self.width == 0:
            raise ValueError("a DCNv2 needs an input: no dense features and no tables")
        self.validate_deep()



class CrossLayer(nn.Module):
    """x0 ⊙ (W x + b) + x, W full rank; with `rank` r, W x + b is a `Factored` W -> r -> W (`layer_ranks`)."""

    def __init__(self, width: int, rank: int | None = None, activation: bool = False):
        super().__init__()
        self.linear = nn.Linear(width, width) if rank is None else Factored(width, rank, width, activation=activation)

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        return x0 * self.linear(x) + x


class MixtureCrossLayer(nn.Module):
    """Σ_k softmax_k(g_k(x)) · x0 ⊙ (U_k tanh(C_k tanh(V_kᵀ x)) + b) + x (DCN-Mix)."""

    def __init__(self, width: int, rank: int, experts: int):
        super().__init__()
        self.v = nn.ModuleList(nn.Linear(width, rank, bias=False) for _ in range(experts))
        self.c = nn.ModuleList(nn.Linear(rank, rank, bias=False) for _ in range(experts))
        self.u = nn.ModuleList(nn.Linear(rank, width, bias=False) for _ in range(experts))
        self.gates = nn.ModuleList(nn.Linear(width, 1, bias=False) for _ in range(experts))
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x0: Tensor, x: Tensor) -> Tensor:
        outs, scores = [], []
        for v, c, u, gate in zip(self.v, self.c, self.u, self.gates):
            outs.append(x0 * (u(torch.tanh(c(torch.tanh(v(x))))) + self.bias))
            scores.append(gate(x))
        weights = torch.softmax(torch.cat(scores, dim=1), dim=1)  # (B, K)
        return (torch.stack(outs, dim=2) * weights.unsqueeze(1)).sum(2) + x


class CrossNet(nn.Module):
    def __init__(self, s: DCNv2Structure):
        super().__init__()
        self.layers = nn.ModuleList(
            CrossLayer(s.width, s.layer_rank(f"cross.layers.{i}.linear"), s.factor_activation)
            if s.cross_rank is None else MixtureCrossLayer(s.width, s.cross_rank, s.experts)
            for i in range(s.cross_layers))

    def forward(self, x0: Tensor) -> Tensor:
        x = x0
        for layer in self.layers:
            x = layer(x0, x)
        return x


class DCNv2(TablesOfRecord, nn.Module):
    """DCNv2: dense (B, N) and sparse (B, S) inputs -> logits (B,). The same table and checkpoint interface as
    `DLRM` (`sparse`, `holds_tables`, `table_keys`, `linear_layers`, ...), so training, checkpoints, export and
    sharding never ask which model runs."""

    def __init__(self, structure: DCNv2Structure, sparse_grad: bool = True, seed: int | None = None,
                 hold_tables: bool = True, init: InitScheme | None = None):
        super().__init__()
        self.structure = structure
        self.use_dense = structure.use_dense
        self.parallel = structure.stacking == "parallel" and structure.cross_layers > 0
        self.sparse = SparseArch(LookupView(structure), sparse_grad=sparse_grad, hold_tables=hold_tables)
        # The dense block's place in x0, as a module: what reads or replaces the block (held-out ablation, the
        # collapse guard) hooks its output, as DLRM's bottom MLP's.
        self.dense = None
        if structure.use_dense:
            self.dense = nn.BatchNorm1d(structure.num_dense) if structure.dense_norm == "batch" else nn.Identity()
        self.cross = CrossNet(structure)
        names = structure.hidden_names
        deep_in = structure.width
        self.deep = None
        if structure.deep:
            self.deep = MLP(deep_in, structure.deep, relu_last=True,
                            ranks=[structure.layer_rank(n) for n in names],
                            factor_activation=structure.factor_activation,
                            batch_norm=[structure.has_batch_norm(n) for n in names],
                            dropout=[structure.dropout_of(n) for n in names])
        self.head = nn.Linear(structure.head_in, 1)
        self.dim_gate: nn.Parameter | None = None  # no shared-dimension gate: DLRM's `dot` alone has one
        self.reset_parameters(seed, init)

    def reset_parameters(self, seed: int | None = None, init: InitScheme | None = None) -> None:
        """Every weight from one generator seeded by `seed`, the tables last (as `DLRM.reset_parameters`): the
        reference Linear init for every layer (a Linear without bias draws its weight only), zero cross biases."""
        init = init or InitScheme()
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        if isinstance(self.dense, nn.BatchNorm1d):
            self.dense.reset_parameters()  # scale 1, shift 0, fresh statistics: draws nothing
        for layer in self.cross.layers:
            for linear in (m for m in layer.modules() if isinstance(m, nn.Linear)):
                _init_weight(linear, gen)
            if isinstance(layer, CrossLayer):
                for linear in (m for m in layer.modules() if isinstance(m, nn.Linear)):
                    nn.init.zeros_(linear.bias)
        if self.deep is not None:
            self.deep.reset_parameters(gen, init.zero_bias)
        _init_linear(self.head, gen, init.zero_bias)
        self.sparse.reset_projections(gen)
        self.sparse.reset_tables(gen, init.embedding_std)

    def forward(self, dense: Tensor, sparse: Tensor) -> Tensor:
        parts = self.sparse(sparse)
        if self.dense is not None:
            parts = [self.dense(dense)] + parts
        x0 = torch.cat(parts, dim=1)
        if self.parallel:
            crossed = self.cross(x0)
            out = crossed if self.deep is None else torch.cat([crossed, self.deep(x0)], dim=1)
        else:
            out = self.cross(x0)
            out = out if self.deep is None else self.deep(out)
        return self.head(out).squeeze(1)

    def linear_layers(self) -> dict[str, nn.Linear | Factored]:
        """Every Linear by its module path (the cross network's, the deep network's, the head); a layer of
        `structure.layer_ranks` is its `Factored` (as `DLRM.linear_layers`)."""
        out = {}
        for i, layer in enumerate(self.cross.layers):
            if isinstance(layer, CrossLayer):
                out[f"cross.layers.{i}.linear"] = layer.linear
            else:
                out.update({f"cross.layers.{i}.{name}": m for name, m in layer.named_modules()
                            if isinstance(m, nn.Linear)})
        if self.deep is not None:
            out.update({f"deep.layers.{i}": m for i, m in enumerate(self.deep.layers)})
        out["head"] = self.head
        return out

    def neuron_layers(self) -> dict[str, nn.Linear]:
        """The layers whose outputs are neurons (`Kept.neurons`): the deep network's (a cross layer's outputs are
        x0 positions, the features' and dims' groups)."""
        return {} if self.deep is None else {f"deep.layers.{i}": m for i, m in enumerate(self.deep.layers)}

    def batch_norms(self) -> dict[str, nn.BatchNorm1d]:
        if self.deep is None:
            return {}
        return {f"deep.layers.{i}": m for i, m in enumerate(self.deep.norms) if isinstance(m, nn.BatchNorm1d)}

    def factored_layers(self) -> dict[str, Factored]:
        """The factored layers (those of `structure.layer_ranks`) by their stable names."""
        return {name: m for name, m in self.linear_layers().items() if isinstance(m, Factored)}

    def interaction_flops(self) -> int:
        return 0  # every multiply-add of the cross network is in its Linears

    def extra_params(self) -> int:
        """Parameters outside Linears and tables: the mixture layers' shared biases and the dense block's norm
        (`DCNv2Structure.dense_norm_params`)."""
        return self.structure.dense_norm_params + sum(
            layer.bias.numel() for layer in self.cross.layers if isinstance(layer, MixtureCrossLayer))


def _init_weight(layer: nn.Linear, generator: torch.Generator | None) -> None:
    """The reference Linear init of the weight alone: W ~ N(0, sqrt(2/(in+out)))."""
    fan_out, fan_in = layer.weight.shape
    with torch.no_grad():
        layer.weight.normal_(0.0, (2.0 / (fan_in + fan_out)) ** 0.5, generator=generator)


def dense_dcnv2_structure(sparse_names: list[str], table_sizes: list[int], embedding_dim: int, num_dense: int,
                          deep: list[int], cross_layers: int, cross_rank: int | None, experts: int, stacking: str,
                          dense_names: list[str] | None = None, batch_norm=None, dropout=None,
                          dense_norm: str = "batch") -> DCNv2Structure:
    """The dense DCNv2 over every feature of the data (one table each, all `embedding_dim` wide)."""
    return DCNv2Structure(
        table_dims=[embedding_dim] * len(sparse_names), cross_layers=cross_layers, cross_rank=cross_rank,
        experts=experts, stacking=stacking, dense_norm=dense_norm,
        **dense_deep_fields(sparse_names, table_sizes, num_dense, deep, dense_names, batch_norm, dropout))


@dataclass(kw_only=True)
class DCNv2Config(DeepModelConfig):
    """What `model` admits for model=dcnv2 (read by `config.validate_config`): the shared keys and the cross
    network's."""

    cross_layers: int = spec(3, ge=0)
    cross_rank: int | None = spec(None, gt=0, null="full-rank cross matrices")
    experts: int = spec(1, gt=0)
    stacking: str = spec("parallel", choices=STACKINGS)
    dense_norm: str = spec("batch", choices=DENSE_NORMS)


class DCNv2Family(PartsFamily):
    name = "dcnv2"
    resource_model_class = "DCNv2ResourceModel"
    config_schema = DCNv2Config
    structure_type = DCNv2Structure
    model_type = DCNv2

    def check_config(self, m: DCNv2Config) -> None:
        from ..config import ConfigError

        if m.cross_layers == 0 and not m.deep:
            raise ConfigError("config keys `model.cross_layers` and `model.deep`: the model needs a cross layer or a "
                              "deep layer")

    def dense_structure(self, model_cfg, meta) -> DCNv2Structure:
        with config_errors():
            return dense_dcnv2_structure(
                **dense_config_args(model_cfg, meta), cross_layers=int(model_cfg.get("cross_layers", 3)),
                cross_rank=model_cfg.get("cross_rank"), experts=int(model_cfg.get("experts", 1)),
                stacking=str(model_cfg.get("stacking", "parallel")),
                dense_norm=str(model_cfg.get("dense_norm", "batch")))


FAMILY = DCNv2Family()
