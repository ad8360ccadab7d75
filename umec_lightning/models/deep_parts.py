"""The compression parts the deep families (DCNv2, DeepFM, Wide & Deep) share: their input x is
[dense (N, iff read) | e_1 | … | e_F], read by one Linear (or, for DCNv2, the cross network), then a deep network
`deep.layers.<i>` (ReLU, optional batch norm) and the head.

    groups:    the kind checks, the tables' offsets in x, the "features" incidence over x, the deep neuron sets, and
               reading masks into a `Kept` (mask checks, the features' liveness, the kept deep neurons)
    surgery:   `KeptPlan` (a `Kept` resolved against one model), its shared checks, the deep network and batch-norm
               slicing, and the rebuild of the smaller model (`load_state_dict(assign=True)`, device and mode)
    resources: `DeepResourceModel`, the layout pieces of the width table (kept units per set or constants) and the
               Linear cost terms of the deep layers and the head

Each family keeps its own parts (the cross network, the FM, the wide part, the compression gate) in its files.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import Tensor

from ..compression.groups import KINDS, GroupMember, GroupSet, _kept_list
from ..compression.kept import Kept
from ..compression.resource import GroupResourceModel

# ---- groups -------------------------------------------------------------------------------------------------


def check_kinds(kinds, allowed: frozenset, model_name: str) -> set:
    """The group kinds asked for, as a set; ValueError for an unknown kind or one the family does not have."""
    kinds = set(kinds)
    unknown = kinds - set(KINDS)
    if unknown:
        raise ValueError(f"unknown group kinds {sorted(unknown)}; choose from {KINDS}")
    if kinds - allowed:
        raise ValueError(f"group kinds {sorted(kinds - allowed)} do not exist in {model_name} (it has "
                         f"{', '.join(sorted(allowed))})")
    return kinds


def check_dim_block(dim_block) -> int:
    b = int(dim_block)
    if b < 1:
        raise ValueError(f"config key `mode.method.admm.dim_block` must be a positive integer, got {dim_block!r}")
    return b


def table_offsets(s) -> tuple[int, list[int]]:
    """(width of the dense block in x, the first x column of every table)."""
    head = s.num_dense if s.use_dense else 0
    starts, col = [], head
    for d in s.table_dims:
        starts.append(col)
        col += d
    return head, starts


def feature_incidence(s, width: int, device) -> tuple[list[str], Tensor]:
    """The "features" groups (["dense"] iff read, then the features) and their incidence (width, G) over x: the
    dense block's columns, each table's columns."""
    head, starts = table_offsets(s)
    ud = int(s.use_dense)
    labels = (["dense"] if ud else []) + s.feature_names
    inc = torch.zeros(width, len(labels), device=device)
    if ud:
        inc[:head, 0] = 1.0
    for f, (start, d) in enumerate(zip(starts, s.table_dims)):
        inc[start: start + d, ud + f] = 1.0
    return labels, inc


def dims_incidence(width: int, starts: list[int], blocks: Tensor) -> Tensor:
    """(width, G): the dim groups `blocks` (D, G) on the D columns of x from each of `starts`."""
    inc = torch.zeros(width, blocks.shape[1], device=blocks.device)
    for start in starts:
        inc[start: start + blocks.shape[0]] = blocks
    return inc


def dense_group_incidence(s, groups: int, device) -> Tensor:
    """(num_dense, G): every column of a Linear on the dense block in the "dense" group (the first)."""
    inc = torch.zeros(s.num_dense, groups, device=device)
    inc[:, 0] = 1.0
    return inc


def neuron_sets(model, device) -> list[GroupSet]:
    """"neurons:deep.layers.<i>": one group per output row of each deep layer (a batch-normalised layer's: its
    channel's (γ, β), as DLRM's)."""
    sets: list[GroupSet] = []
    if model.deep is None:
        return sets
    norms = model.batch_norms()
    for i, layer in enumerate(model.deep.layers):
        name = f"deep.layers.{i}"
        eye = torch.eye(layer.out_features, device=device)
        params = (norms[name].weight, norms[name].bias) if name in norms else (layer.weight, layer.bias)
        sets.append(GroupSet(f"neurons:{name}", "neuron", [GroupMember(p, 0, eye) for p in params],
                             [str(j) for j in range(layer.out_features)]))
    return sets


def read_masks(s, sets: list[GroupSet], pruned: dict[str, Tensor]) -> tuple[dict[str, GroupSet], list[bool]]:
    """The sets by name and the "features" groups pruned ([dense (iff read), features]), after checking that every
    mask names a set and has its number of groups."""
    by_name = {gs.name: gs for gs in sets}
    unknown = set(pruned) - set(by_name)
    if unknown:
        raise ValueError(f"masks for unknown group sets {sorted(unknown)}")
    for name, m in pruned.items():
        if m.numel() != by_name[name].num_groups:
            raise ValueError(f"mask for {name} has {m.numel()} entries, the set has {by_name[name].num_groups}")
    feat = pruned.get("features")
    gone = [False] * (int(s.use_dense) + s.num_features) if feat is None else [bool(x) for x in feat.cpu()]
    return by_name, gone


def kept_table_dims(s, by_name: dict[str, GroupSet], pruned: dict[str, Tensor]) -> dict[str, list[int]]:
    """Per table, the columns its "dims:<feature>" set keeps (all without a set)."""
    return {name: _kept_list(pruned.get(f"dims:{name}"), d, by_name[f"dims:{name}"].width
                             if f"dims:{name}" in by_name else 1)
            for name, d in zip(s.feature_names, s.table_dims)}


def kept_from_liveness(model, pruned: dict[str, Tensor], gone: list[bool], alive: list[bool],
                       dims: dict[str, list[int]]) -> Kept:
    """The `Kept` of the live inputs (the dense block unless its group is pruned; the tables `alive`, with `dims`)
    and of the deep neurons the masks keep. ValueError when no input or no neuron of a deep layer is left."""
    s = model.structure
    use_dense = bool(s.use_dense) and not gone[0]
    if not use_dense and not any(alive):
        raise ValueError("the masks prune every input (dense block and all tables)")
    neurons = {}
    for i, layer in enumerate(model.deep.layers if model.deep is not None else []):
        name = f"deep.layers.{i}"
        neurons[name] = _kept_list(pruned.get(f"neurons:{name}"), layer.out_features)
        if not neurons[name]:
            raise ValueError(f"the masks prune every neuron of {name}")
    return Kept(use_dense=use_dense,
                feature_ids=[fid for fid, keep in zip(s.feature_ids, alive) if keep],
                dims={name: dims[name] for name, keep in zip(s.feature_names, alive) if keep},
                neurons=neurons, pairs=None)


# ---- surgery ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeptPlan:
    """A `Kept` resolved against one model: sorted, validated, in that model's numbering."""

    use_dense: bool
    features: list[int]  # kept positions in the model's tables (sorted)
    dims: list  # the kept embedding columns: per kept feature (DCNv2, Wide & Deep), or one shared list (DeepFM)
    positions: list[int]  # P: the kept x columns, in x order
    neurons: list[list[int]]  # per deep layer: its kept output rows (sorted, non-empty)


def sorted_indices(values, size: int, what: str) -> list[int]:
    out = sorted({int(v) for v in values})
    if out and (out[0] < 0 or out[-1] >= size):
        raise ValueError(f"{what}: indices must lie in [0, {size}), got {out[0]}..{out[-1]}")
    return out


def refuse_factoring(kept, bases, model_name: str, yet: str = "") -> None:
    """ValueError for `bases` or `kept.ranks`: the family has no factorisation (`yet`: " yet" where planned)."""
    if bases:
        raise ValueError(f"bases given for {sorted(bases)[:5]}: {model_name} has no factorisation{yet}")
    if kept.ranks:
        raise ValueError(f"Kept ranks {dict(list(kept.ranks.items())[:3])} ask for a factorisation, which "
                         f"{model_name} does not have{yet}")


def table_positions(s, kept) -> dict[int, int]:
    """Feature id -> position in the model's tables; ValueError for a kept feature or table the model lacks."""
    names = s.feature_names
    position = {fid: pos for pos, fid in enumerate(s.feature_ids)}
    unknown = [f for f in kept.feature_ids if f not in position]
    if unknown:
        raise ValueError(f"Kept feature ids {unknown[:5]} are not read by the model ({s.feature_ids})")
    unknown_dims = sorted(set(kept.dims) - set(names))
    if unknown_dims:
        raise ValueError(f"Kept dims name tables the model does not have: {unknown_dims[:5]} (tables {names[:4]}…)")
    return position


def kept_table_columns(s, kept, position: dict[int, int], drop_empty: bool):
    """(use_dense, features, dims, positions) of tables of their own widths: the dense block iff kept and read,
    the kept features in the model's order with their kept columns, and P, the kept x columns. `drop_empty`: a
    table with no kept column is dropped with its feature."""
    use_dense = bool(kept.use_dense) and s.use_dense
    offset = s.num_dense if s.use_dense else 0
    positions = list(range(s.num_dense)) if use_dense else []
    kept_positions = {position[f] for f in kept.feature_ids}
    features, dims = [], []
    for p, (name, width) in enumerate(zip(s.feature_names, s.table_dims)):
        if p in kept_positions:
            d = sorted_indices(kept.dims.get(name, range(width)), width, f"dims of table {name}")
            if d or not drop_empty:
                features.append(p)
                dims.append(d)
                positions += [offset + j for j in d]
        offset += width
    return use_dense, features, dims, positions


def kept_neuron_rows(s, kept) -> list[list[int]]:
    """Per deep layer, its kept output rows (all where `kept` does not name it); ValueError for an empty layer."""
    neurons = []
    for name, width in zip(s.hidden_names, s.deep):
        rows = sorted_indices(kept.neurons.get(name, range(width)), width, f"neurons of {name}")
        if not rows:
            raise ValueError(f"{name} keeps no neuron: the deep network would be cut")
        neurons.append(rows)
    return neurons


def kept_structure_fields(s, plan: KeptPlan) -> dict:
    """The smaller structure's fields every deep family sets alike (its own fields aside)."""
    return dict(
        sparse_names=list(s.sparse_names),
        feature_ids=[s.feature_ids[p] for p in plan.features],
        table_sizes=[s.table_sizes[p] for p in plan.features],
        num_dense=s.num_dense,
        deep=[len(rows) for rows in plan.neurons],
        use_dense=plan.use_dense,
        dense_names=None if s.dense_names is None else list(s.dense_names),
        batch_norm=None if s.batch_norm is None else list(s.batch_norm),
        dropout=None if s.dropout is None else dict(s.dropout),
    )


def index(t: Tensor, dim: int, keep: list[int]) -> Tensor:
    return t.index_select(dim, torch.tensor(keep, dtype=torch.long, device=t.device))


def cols_rows(weight: Tensor, rows: list[int] | None, cols: list[int] | None) -> Tensor:
    w = weight.detach()
    if rows is not None:
        w = index(w, 0, rows)
    if cols is not None:
        w = index(w, 1, cols)
    return w if (rows is not None or cols is not None) else w.clone()


def slice_deep(model, neurons: list[list[int]], columns: list[int], state: dict[str, Tensor],
               first_weight: Tensor | None = None) -> list[int]:
    """Into `state`: every deep layer's kept rows (layer 0 its `columns` of x, or of `first_weight` in its place;
    layer i > 0 layer i-1's kept rows), its bias and batch-norm channels. Returns the last kept rows (`columns`
    without a deep network)."""
    previous = columns
    if model.deep is None:
        return previous
    for i, (linear, norm) in enumerate(zip(model.deep.layers, model.deep.norms)):
        rows = neurons[i]
        weight = first_weight if i == 0 and first_weight is not None else linear.weight
        state[f"deep.layers.{i}.weight"] = cols_rows(weight, rows, previous)
        state[f"deep.layers.{i}.bias"] = index(linear.bias.detach(), 0, rows)
        if isinstance(norm, torch.nn.BatchNorm1d):
            for key, value in norm.state_dict().items():
                state[f"deep.norms.{i}.{key}"] = value.detach().clone() if value.dim() == 0 \
                    else index(value.detach(), 0, rows)
        previous = rows
    return previous


def rebuild(model_type, structure, state: dict[str, Tensor], like):
    """A fresh model owning `state` (fresh tensors: index_select or clone), placed and moded like `like`.

    Built on `like`'s device with meta tables (nothing allocated for them), then every parameter and buffer
    assigned from `state`: real tables where `like` holds its tables, meta ones of the new shapes where not."""
    device = next(p.device for name, p in like.named_parameters() if not name.startswith("sparse."))
    with torch.device(device):
        out = model_type(structure, sparse_grad=like.sparse_grad, hold_tables=False)
    out.load_state_dict(state, strict=True, assign=True)
    out.train(like.training)
    return out


# ---- resources ----------------------------------------------------------------------------------------------


class LinearTerms:
    """[FLOPs, params] per unit of a product of two width columns, and of one width column, as
    `models.cost.measure` counts a Linear: in·out (2 FLOPs, 1 param) and, with a bias, out (1 FLOP, 1 param)."""

    def __init__(self):
        self.products: dict[tuple[int, int], list[float]] = {}
        self.singles: dict[int, list[float]] = {}

    def add(self, table: dict, key, flops: float, params: float) -> None:
        entry = table.setdefault(key, [0.0, 0.0])
        entry[0] += flops
        entry[1] += params

    def linear(self, a: int, b: int, bias: bool = True, times: int = 1) -> None:
        self.add(self.products, (a, b), 2.0 * times, 1.0 * times)
        if bias:
            self.add(self.singles, b, 1.0 * times, 1.0 * times)

    def deep_and_head(self, first: int, deep: list[int], head_in: int | None, one: int) -> None:
        """The deep layers from column `first` (each with bias), then the head → 1 with bias, reading `head_in`
        (None: the last deep layer's output, or `first` without one)."""
        previous = first
        for col in deep:
            self.linear(previous, col)
            previous = col
        self.linear(previous if head_in is None else head_in, one)

    def tensors(self) -> dict[str, Tensor]:
        """The gather columns (left, right, single) and the coefficients (T, 2) of `DeepResourceModel._cost`."""
        def long(x):
            return torch.tensor(x, dtype=torch.long)

        return dict(left=long([a for a, _ in self.products]), right=long([b for _, b in self.products]),
                    single=long(list(self.singles)),
                    coef=torch.tensor([*self.products.values(), *self.singles.values()], dtype=torch.float64))


class DeepResourceModel(GroupResourceModel):
    """The layout shared by the deep families' resource models: a width table of the sets' kept units (columns
    0..S-1) and of constants (a set absent from `sets`, or a fixed width), the table rows and the liveness of
    [dense (iff read), features]."""

    def _start_layout(self, s, by_name: dict[str, int]):
        """Set the liveness layout; returns `source(set_name, full)`, the column of the width table that holds the
        set's kept units if the set is active, else a new constant `full` (`self._consts`)."""
        num_sets = self.num_sets
        self.ud = int(s.use_dense)
        self._num_dense = float(s.num_dense)
        self._num_vectors = self.ud + s.num_features
        self._consts: list[float] = []

        def source(set_name: str, full: int) -> int:
            if set_name in by_name:
                return by_name[set_name]
            self._consts.append(float(full))
            return num_sets + len(self._consts) - 1

        return source

    def _base_tensors(self, s) -> dict[str, Tensor]:
        """The constants every deep family's `_evaluate` reads: the constant widths, the sets' group widths, the
        tables' rows and the all-alive liveness row."""
        return dict(
            consts=torch.tensor(self._consts, dtype=torch.float64)[None, :],
            widths=torch.tensor([[float(gs.width) for gs in self.sets]], dtype=torch.float64),
            rows=torch.tensor(s.table_sizes, dtype=torch.float64),
            ones=torch.ones(1, self._num_vectors, dtype=torch.float64),
        )

    @staticmethod
    def _counts(kept, c: SimpleNamespace):
        """(V, S + constants): units kept per column of the width table (a dim group may be b dims)."""
        return c.cat([kept * c.widths, c.tile(c.consts, kept.shape[0])], 1)

    @staticmethod
    def _cost(cols, c: SimpleNamespace):
        """(V, 2) FLOPs, params of the `LinearTerms` over the width columns `cols`."""
        terms = c.cat([c.take(cols, c.left) * c.take(cols, c.right), c.take(cols, c.single)], 1)
        return terms @ c.coef
