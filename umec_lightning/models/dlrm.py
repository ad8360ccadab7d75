"""DLRM (Naumov et al. 2019), faithful to facebookresearch/dlrm, built from a `DLRMStructure`.

Shape letters: B batch, N dense inputs (13 for Criteo), S sparse inputs of the data (26 for Criteo),
F kept sparse features (tables), D embedding dim (`dot`), P kept interaction pairs.

Stable names (what compression addresses):
  sparse.tables[<feature name>]   a `TableView` per kept sparse feature, keyed by its name ("C1"...): its
                                  (rows, r_f) slice of a fused weight, stored at the table's rank r_f (its
                                  full width when not projected); not a module, not in the state dict
  sparse.groups.<g>               a `TableGroup`: the tables of one stored width in one weight
                                  (`sparse.groups.<g>.weight` in the state dict; the per-table keys
                                  `sparse.tables.<name>.weight` of older checkpoints still load)
  sparse.projections[<name>]      Linear(r_f, d_f), only for tables with r_f < d_f; bias iff
                                  `structure.projection_bias`
  dense.layers.<i>                bottom-MLP Linear layers (ReLU after every one, the last too)
  over.layers.<i>                 top-MLP Linear layers (ReLU after all but the last, which gives the logit)
  dense.norms.<i> / over.norms.<i> the BatchNorm1d after hidden layer i (`structure.batch_norm`), between it and
                                  its ReLU; an Identity (no state) where the layer has none
  <layer>.first / <layer>.second  the two factors of a layer named in `structure.layer_ranks` (a `Factored`
                                  module in place of the Linear): Linear(in, r) then Linear(r, out)
  dim_gate                        optional (D,) per-dimension gate under `dot`, only while compressing
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .family import ModelFamily
from .structure import DLRMStructure
from .tables import TablesOfRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InitScheme:
    """How a fresh DLRM draws its weights. Default: the reference DLRM's (Linear W ~ N(0, sqrt(2/(in+out))),
    b ~ N(0, sqrt(1/out)); tables ~ U(±sqrt(1/rows))). `embedding_std`: tables ~ N(0, std) instead;
    `zero_bias`: Linear biases start at 0 (FuxiCTR: std 1e-4 and zero biases, with the same Xavier-normal W)."""

    embedding_std: float | None = None
    zero_bias: bool = False


def _init_linear(layer: nn.Linear, generator: torch.Generator | None = None, zero_bias: bool = False) -> None:
    """Reference init: W ~ N(0, sqrt(2/(in+out))), b ~ N(0, sqrt(1/out)) (or 0: the bias draws nothing)."""
    fan_out, fan_in = layer.weight.shape
    with torch.no_grad():
        layer.weight.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)), generator=generator)
        if zero_bias:
            layer.bias.zero_()
        else:
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


class TableGroup(nn.Embedding):
    """The T tables of one stored width d in one (Σ rows, d) weight, table t at rows offsets[t] onwards.

    forward: ids (T, B), row t holding table t's own ids -> (T, B, d). One lookup, and so one sparse
    gradient and one optimizer update per step for all T tables, much cheaper than T of each
    (bench/embedding_lookup.py, figures in docs/performance.md). It is an nn.Embedding of Σ rows so that code
    finding the sparse-gradient tables by type (CTRModule's densify list, `distributed.sparse_tables`)
    finds it.
    `start`/`stop`: its rows in SparseArch's (F, B) id block; `positions`: its tables' places in the output.
    """

    def __init__(self, rows: list[int], dim: int, positions: list[int], start: int, sparse: bool,
                 device: torch.device | str | None = None):
        super().__init__(sum(rows), dim, sparse=sparse, device=device)
        self.row_offsets = [sum(rows[:t]) for t in range(len(rows))]
        self.register_buffer("offsets", torch.tensor(self.row_offsets, dtype=torch.long), persistent=False)
        self.positions = positions
        self.start, self.stop = start, start + len(rows)

    def forward(self, ids: Tensor) -> Tensor:
        flat = (ids + self.offsets[:, None]).reshape(-1)  # (T·B,) rows of the fused weight
        return F.embedding(flat, self.weight, sparse=self.sparse).view(ids.shape[0], ids.shape[1], -1)


class TableView:
    """One table of a `TableGroup`, read like the nn.Embedding it was: `weight` is its (rows, d) slice of
    the fused weight (a view: in-place writes land in the model), plus num_embeddings, embedding_dim and
    sparse. Not a module, so it is neither in the state dict nor found as a table a second time; no
    forward hook fires on it (hook SparseArch's output list instead)."""

    def __init__(self, group: TableGroup, offset: int, rows: int):
        self.group, self.offset, self.num_embeddings = group, offset, rows

    @property
    def weight(self) -> Tensor:
        return self.group.weight[self.offset: self.offset + self.num_embeddings]

    @property
    def embedding_dim(self) -> int:
        return self.group.embedding_dim

    @property
    def sparse(self) -> bool:
        return self.group.sparse

    @property
    def grad(self) -> Tensor | None:
        """This table's rows of the fused weight's gradient (sparse if that is), None before a backward."""
        grad = self.group.weight.grad
        if grad is None or not grad.is_sparse:
            return None if grad is None else grad[self.offset: self.offset + self.num_embeddings]
        grad = grad.coalesce()
        rows = grad.indices()[0]
        mine = (rows >= self.offset) & (rows < self.offset + self.num_embeddings)
        return torch.sparse_coo_tensor((rows[mine] - self.offset)[None], grad.values()[mine],
                                       (self.num_embeddings, self.embedding_dim), check_invariants=False)


class SparseArch(nn.Module):
    """Embedding lookups: sparse ids (B, S) -> list of F vectors (B, D_f), one id per sample per table.

    Tables of one stored width share one `TableGroup` (`groups`, in order of their first table): one lookup
    per width. `tables` {feature name: `TableView`} reads each table on its own. A table stored at rank
    r_f < D_f looks up (B, r_f) and projects it to (B, D_f) with its own Linear.

    `hold_tables` False: the tables' weights are `meta` tensors (shapes only, nothing allocated); see
    `DLRM.holds_tables`.
    """

    def __init__(self, structure: DLRMStructure, sparse_grad: bool = True, hold_tables: bool = True):
        super().__init__()
        self.feature_names = structure.feature_names
        widths = structure.stored_dims
        by_width: dict[int, list[int]] = {}  # width -> positions of its tables, in feature order
        for f, d in enumerate(widths):
            by_width.setdefault(d, []).append(f)
        self.groups = nn.ModuleList()
        views: dict[str, TableView] = {}
        grouped: list[int] = []  # the positions, group after group
        for d, positions in by_width.items():
            rows = [structure.table_sizes[f] for f in positions]
            group = TableGroup(rows, d, positions, start=len(grouped), sparse=sparse_grad,
                               device=None if hold_tables else "meta")
            self.groups.append(group)
            for f, offset in zip(positions, group.row_offsets):
                views[self.feature_names[f]] = TableView(group, offset, structure.table_sizes[f])
            grouped += positions
        self.tables = {name: views[name] for name in self.feature_names}  # feature order
        self.num_features = len(widths)
        self.projections = nn.ModuleDict(
            {
                self.feature_names[f]: Projection(structure.stored_dims[f], structure.table_dims[f], f,
                                                  bias=structure.projection_bias)
                for f in structure.projected()
            }
        )
        # Which column of the data's sparse block feeds each table, group after group, so that each group's
        # ids are a contiguous slice of the (F, B) block; derived, so not checkpointed.
        feature_ids = [structure.feature_ids[f] for f in grouped]
        self.register_buffer("feature_ids", torch.tensor(feature_ids, dtype=torch.long), persistent=False)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Projections, then tables (`reset_projections`, `reset_tables`)."""
        self.reset_projections(generator)
        self.reset_tables(generator)

    def reset_tables(self, generator: torch.Generator | None = None, std: float | None = None) -> None:
        """Tables ~ U(±sqrt(1/rows)) (reference DLRM), or N(0, std) with `std` (FuxiCTR: 1e-4), drawn table by
        table in feature order (a table's view is contiguous, so it draws what a standalone table would).
        Meta tables draw nothing."""
        with torch.no_grad():
            for table in self.tables.values():
                if std is not None:
                    table.weight.normal_(0.0, std, generator=generator)
                    continue
                bound = math.sqrt(1.0 / table.num_embeddings)
                table.weight.uniform_(-bound, bound, generator=generator)

    def reset_projections(self, generator: torch.Generator | None = None) -> None:
        """Projections like the reference Linear, N(0, sqrt(2/(in+out))) (a projection bias starts at 0)."""
        with torch.no_grad():
            for projection in self.projections.values():
                fan_out, fan_in = projection.weight.shape
                projection.weight.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)), generator=generator)
                if projection.bias is not None:
                    projection.bias.zero_()

    def fuse_table_keys_(self, state_dict: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
        """Rewrite, in place, the per-table weights `<prefix>tables.<name>.weight` that checkpoints and
        compressed files held before the tables were grouped (and that `extract` builds) into their group's
        `<prefix>groups.<g>.weight`, concatenated; a group whose weight is there, or whose tables are not
        all there, is left as it is. Returns `state_dict`."""
        for g, group in enumerate(self.groups):
            keys = [f"{prefix}tables.{self.feature_names[f]}.weight" for f in group.positions]
            if f"{prefix}groups.{g}.weight" not in state_dict and all(k in state_dict for k in keys):
                state_dict[f"{prefix}groups.{g}.weight"] = torch.cat([state_dict.pop(k) for k in keys])
        return state_dict

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Called before the groups load theirs (from the same dict): old per-table keys load too.
        self.fuse_table_keys_(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, sparse: Tensor) -> list[Tensor]:
        ids = sparse.t().index_select(0, self.feature_ids)  # (F, B), contiguous, group after group
        out = [ids] * self.num_features  # placeholders, each replaced by its table's (B, d_f) below
        for group in self.groups:
            # unbind, not T_g indexings: its backward stacks the T_g gradients once, where each select's
            # would fill a whole (T_g, B, d_g) gradient.
            vectors = group(ids[group.start: group.stop]).unbind(0)  # T_g of (B, d_g)
            for t, f in enumerate(group.positions):
                out[f] = vectors[t]
        for projection in self.projections.values():  # empty for a model without projections
            out[projection.position] = projection(out[projection.position])
        return out


class MLP(nn.Module):
    """Stack of Linear layers: (B, in) -> (B, widths[-1]). ReLU after every layer, or all but the last.

    `ranks[i]` (optional, None entries: plain) stores layer i as a `Factored` in -> r -> out (ReLU between
    the factors iff `factor_activation`). `batch_norm[i]` puts a BatchNorm1d between layer i and its ReLU
    (`norms[i]`, an Identity where off: parallel to `layers`, so TorchScript zips them); `dropout[i]` > 0 a
    dropout after it, in training only (FuxiCTR's block: Linear, BN, activation, dropout)."""

    def __init__(self, in_features: int, widths: list[int], relu_last: bool,
                 ranks: list[int | None] | None = None, factor_activation: bool = False,
                 batch_norm: list[bool] | None = None, dropout: list[float] | None = None):
        super().__init__()
        sizes = [in_features, *widths]
        ranks = ranks or [None] * len(widths)
        self.layers = nn.ModuleList(
            nn.Linear(a, b) if r is None else Factored(a, r, b, activation=factor_activation)
            for a, b, r in zip(sizes[:-1], sizes[1:], ranks)
        )
        batch_norm = batch_norm or [False] * len(widths)
        self.norms = nn.ModuleList(nn.BatchNorm1d(b) if on else nn.Identity() for b, on in zip(widths, batch_norm))
        self.dropout: list[float] = [float(p) for p in (dropout or [0.0] * len(widths))]
        self.relu_last = relu_last

    def reset_parameters(self, generator: torch.Generator | None = None, zero_bias: bool = False) -> None:
        for layer in self.layers:
            if isinstance(layer, Factored):
                _init_linear(layer.first, generator, zero_bias)
                _init_linear(layer.second, generator, zero_bias)
            else:
                _init_linear(layer, generator, zero_bias)
        for norm in self.norms:
            if isinstance(norm, nn.BatchNorm1d):
                norm.reset_parameters()  # γ = 1, β = 0, running mean 0, var 1: draws nothing

    def forward(self, x: Tensor) -> Tensor:
        last = len(self.layers) - 1
        for i, (layer, norm) in enumerate(zip(self.layers, self.norms)):
            x = norm(layer(x))
            if i < last or self.relu_last:
                x = torch.relu(x)
            p = self.dropout[i]
            if p > 0.0:
                x = F.dropout(x, p, self.training)
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


class DLRM(TablesOfRecord, nn.Module):
    """DLRM: dense (B, N) and sparse (B, S) inputs -> logits (B,). The loss lives outside the model."""

    def __init__(self, structure: DLRMStructure, sparse_grad: bool = True, seed: int | None = None,
                 hold_tables: bool = True, init: InitScheme | None = None):
        super().__init__()
        self.structure = structure
        self.sparse = SparseArch(structure, sparse_grad=sparse_grad, hold_tables=hold_tables)
        act = structure.factor_activation
        self.dense = None
        if structure.use_dense:
            names = [f"dense.layers.{i}" for i in range(len(structure.bottom))]
            self.dense = MLP(structure.num_dense, structure.bottom, relu_last=True,
                             ranks=[structure.layer_rank(n) for n in names], factor_activation=act,
                             batch_norm=[structure.has_batch_norm(n) for n in names],
                             dropout=[structure.dropout_of(n) for n in names])
        self.interaction = InteractionArch(structure)
        names = [f"over.layers.{i}" for i in range(len(structure.top))]
        self.over = MLP(structure.interaction_out, structure.top, relu_last=False,
                        ranks=[structure.layer_rank(n) for n in names], factor_activation=act,
                        batch_norm=[structure.has_batch_norm(n) for n in names],
                        dropout=[structure.dropout_of(n) for n in names])
        self.dim_gate: nn.Parameter | None = None
        self.reset_parameters(seed, init)

    def reset_parameters(self, seed: int | None = None, init: InitScheme | None = None) -> None:
        """Every weight drawn from one generator (seeded by `seed`), the tables last: a model without its
        tables (`hold_tables=False`, whose meta tables draw nothing) gets the same MLPs and projections.
        `init`: the scheme (default: the reference DLRM's)."""
        init = init or InitScheme()
        gen = None
        if seed is not None:
            gen = torch.Generator().manual_seed(seed)
        if self.dense is not None:
            self.dense.reset_parameters(gen, init.zero_bias)
        self.sparse.reset_projections(gen)
        self.over.reset_parameters(gen, init.zero_bias)
        self.sparse.reset_tables(gen, init.embedding_std)

    def enable_dim_gate(self) -> nn.Parameter:
        """Add a (D,) gate multiplying every interaction vector (`dot` only): the group handle for
        embedding-dimension pruning, so that no step has to scan the tables. Folded away on extraction."""
        if self.structure.interaction != "dot":
            raise ValueError("a shared dimension gate only exists under `dot` interaction")
        if self.dim_gate is None:
            device = next(self.over.parameters()).device  # not a table's: those may be meta
            self.dim_gate = nn.Parameter(torch.ones(self.structure.dim, device=device))
        return self.dim_gate

    def forward(self, dense: Tensor, sparse: Tensor) -> Tensor:
        bottom_out = self.dense(dense) if self.dense is not None else None
        embeddings = self.sparse(sparse)
        return self.over(self.interaction(bottom_out, embeddings, self.dim_gate)).squeeze(1)

    def interaction_flops(self) -> int:
        """Per-sample FLOPs of the interaction outside Linears: a `dot` pair is one D-long dot product, 2·D."""
        return 2 * self.structure.dim * int(self.interaction.li.numel()) if self.interaction.kind == "dot" else 0

    def extra_params(self) -> int:
        """Parameters outside Linears and tables: the dim gate while compressing."""
        return 0 if self.dim_gate is None else self.dim_gate.numel()

    def linear_layers(self) -> dict[str, nn.Linear | Factored]:
        """Every MLP layer by its stable name: an nn.Linear, or a `Factored` for a layer named in
        `structure.layer_ranks` (same in_features/out_features, no `weight`: see `input_linear`,
        `output_linear`)."""
        out = {}
        if self.dense is not None:
            out.update({f"dense.layers.{i}": m for i, m in enumerate(self.dense.layers)})
        out.update({f"over.layers.{i}": m for i, m in enumerate(self.over.layers)})
        return out

    def neuron_layers(self) -> dict[str, nn.Linear | Factored]:
        """The layers whose outputs are neurons (`Kept.neurons`): every MLP layer but the logit's."""
        return {name: m for name, m in self.linear_layers().items() if name != self.structure.logit_layer}

    def batch_norms(self) -> dict[str, nn.BatchNorm1d]:
        """The batch norms by the stable name of the Linear layer they follow (`structure.batch_norm`)."""
        out = {}
        for prefix, mlp in (("dense", self.dense), ("over", self.over)):
            if mlp is not None:
                out.update({f"{prefix}.layers.{i}": m for i, m in enumerate(mlp.norms)
                            if isinstance(m, nn.BatchNorm1d)})
        return out

    def factored_layers(self) -> dict[str, Factored]:
        """The factored layers (those of `structure.layer_ranks`) by their stable names."""
        return {name: m for name, m in self.linear_layers().items() if isinstance(m, Factored)}


class DLRMFamily(ModelFamily):
    """DLRM (`models.family`): the family every compression method knows. Its compression parts live in
    `compression/groups.py`, `resource.py` and `extract.py`."""

    name = "dlrm"
    kinds = frozenset({"feature", "neuron", "dim", "pair"})
    offers = frozenset({"groups", "factorise"})
    structure_type = DLRMStructure

    def group_sets(self, model, kinds, dim_block: int = 1):
        from ..compression.groups import dlrm_group_sets

        return dlrm_group_sets(model, kinds, dim_block)

    def resource_model(self, model, sets, device=None):
        from ..compression.resource import ResourceModel

        return ResourceModel(model, sets, device=device)

    def kept_from_masks(self, model, sets, pruned):
        from ..compression.groups import dlrm_kept_from_masks

        return dlrm_kept_from_masks(model, sets, pruned)

    def extracted_structure(self, model, kept, bases=None, factor_activation=None):
        from ..compression.extract import dlrm_extracted_structure

        return dlrm_extracted_structure(model, kept, bases, factor_activation=factor_activation)

    def extract(self, model, kept, bases=None, factor_activation=None):
        from ..compression.extract import dlrm_extract

        return dlrm_extract(model, kept, bases, factor_activation=factor_activation)

    @property
    def model_type(self) -> type:
        return DLRM

    @property
    def config_schema(self) -> type:
        from ..schema import Model

        return Model

    def check_config(self, m) -> None:
        from ..config import ConfigError

        if m.top[-1] != 1:
            raise ConfigError(f"config key `model.top` must end in 1 (the logit), got {m.top}")
        if m.interaction == "dot" and m.bottom and m.bottom[-1] != m.embedding_dim:
            raise ConfigError(f"config key `model.bottom`: under `dot` the bottom MLP must end in "
                              f"model.embedding_dim={m.embedding_dim}, got {m.bottom}")

    def dense_structure(self, model_cfg, meta) -> DLRMStructure:
        """The dense model for this data. Without dense features there is no bottom MLP (the stock model configs
        work unchanged); with them, an empty `model.bottom` is an error."""
        from ..config import ConfigError, plain
        from .structure import dense_structure

        bottom = list(model_cfg.bottom or [])
        if not meta.dense_names:
            if bottom:
                log.info("the data has no dense features: the model has no bottom MLP (model.bottom=%s unused)",
                         bottom)
            bottom = []
        elif not bottom:
            raise ConfigError(f"config key `model.bottom` is empty, but the data has {len(meta.dense_names)} dense "
                              f"features ({', '.join(list(meta.dense_names)[:4])}…): give the bottom MLP's widths")
        settings = {key: plain(model_cfg.get(key)) for key in ("batch_norm", "dropout")}
        try:
            return dense_structure(
                sparse_names=list(meta.sparse_names),
                table_sizes=list(meta.table_sizes),
                embedding_dim=int(model_cfg.embedding_dim),
                bottom=bottom,
                top=list(model_cfg.top),
                num_dense=len(meta.dense_names),
                interaction=model_cfg.interaction,
                self_interaction=bool(model_cfg.self_interaction),
                dense_names=list(meta.dense_names),
                **settings,
            )
        except ValueError as err:
            if "config key" in str(err):
                raise ConfigError(str(err)) from None
            raise


FAMILY = DLRMFamily()
