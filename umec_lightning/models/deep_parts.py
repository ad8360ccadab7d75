"""The compression parts the deep families (DCNv2, DeepFM, Wide & Deep) share: their input x is
[dense (N, iff read) | e_1 | … | e_F], read by one Linear (or, for DCNv2, the cross network), then a deep network
`deep.layers.<i>` (ReLU, optional batch norm) and the head.

    groups:    the kind checks, the tables' offsets in x, the "features" incidence over x, the deep neuron sets, and
               reading masks into a `Kept` (mask checks, the features' liveness, the kept deep neurons)
    surgery:   `KeptPlan` (a `Kept` resolved against one model), its shared checks, the deep network and batch-norm
               slicing, and the rebuild of the smaller model (`load_state_dict(assign=True)`, device and mode);
               the factorisation (`FactorPlan`: `kept.ranks` and `bases` resolved, as DLRM's `compression.extract`
               does them, below)
    resources: `DeepResourceModel`, the layout pieces of the width table (kept units per set or constants), the
               Linear cost terms of the deep layers (factored or not) and the head, and the tables' (projected or not)

Factorisation (the semantics of `compression.extract`, on a deep family's units):

    table f     its looked-up vector (`structure.lookup_dims`: the embedding, then the first-order weight of DeepFM and
                Wide & Deep), kept columns C = its kept dims then that first-order column, E (rows × |C|) = the lookup
                restricted to C (a compression gate multiplies its columns). `kept.ranks[name] = r` < the stored width
                min(stored, |C|) replaces E by (E − μ) V (rows × r) and a projection r -> |C| of weight V, bias μ: V the
                top-r eigenvectors of EᵀE and μ = 0 (the truncated SVD), or a given `Basis` (|C| × r, mean |C|).
                A carried projection whose kept output is no wider than its input is multiplied into the table.
    Linear      a deep layer, or DCNv2's full-rank cross matrix `cross.layers.<i>.linear` (`structure.linear_shapes`),
                pruned (kept rows, kept input columns; a batch norm after it folded in when it ends factored):
                `kept.ranks[name] = r` stores y = W x + b as [Uᵀ W, Uᵀ (b − μ)] then [U, μ] (`Factored`), U the top-r
                left singular vectors of W and μ = b, or a given `Basis` (out × r: out = the kept rows; a cross
                matrix's are the kept x0 positions). `factor_activation`: a ReLU between the factors. A factored
                layer is carried (rows of its second factor, columns of its first), re-factorised from its product
                when named (refused under factor_activation), multiplied back when its rank exceeds min(in, out).
    head        never factorised (`structure.logit_layer`); neither are DeepFM's first-order and Wide & Deep's
                wide Linear (N -> 1), nor a DCN-Mix layer's V, C, U and gates.

Each family keeps its own parts (the cross network, the FM, the wide part, the compression gate) in its files.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import Tensor

from ..compression.extract import (
    Basis,
    _chain,
    _check_basis,
    _factorise_layer,
    _factorise_table,
    _product,
    _select,
    fitted_layer_ranks,
)
from ..compression.groups import KINDS, GroupMember, GroupSet, _kept_list
from ..compression.kept import Kept
from ..compression.resource import GroupResourceModel
from .dlrm import Factored

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


def slice_deep(model, neurons: list[list[int]], columns: list[int], state: dict[str, Tensor], structure,
               factors: FactorPlan, column_scale: Tensor | None = None) -> list[int]:
    """Into `state`: every deep layer's kept rows (layer 0 its `columns` of x, those columns of its weight times
    `column_scale` (its input width) first where given; layer i > 0 layer i-1's kept rows), its bias and batch-norm
    channels, factorised or carried as the extracted `structure` stores it (`store_layer`). Returns the last kept
    rows (`columns` without a deep network)."""
    previous = columns
    if model.deep is None:
        return previous
    norms = model.batch_norms()
    for i, rows in enumerate(neurons):
        name = f"deep.layers.{i}"
        store_layer(state, name, layer_chain(model, name, rows, previous, structure, factors,
                                             column_scale if i == 0 else None))
        if structure.has_batch_norm(name):
            for key, value in norms[name].state_dict().items():
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


# ---- factorisation -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FactorPlan:
    """`kept.ranks` and `bases` resolved against one model and its `KeptPlan` (module docstring)."""

    columns: list[list[int]]  # per kept feature: its kept looked-up columns (kept dims, then the first-order column)
    stored: list[int]  # per kept feature: the stored width of its extracted table
    factorised: list[bool]  # per kept feature: replaced by its rank-r factorisation (stored < its current width)
    projection_bias: list[bool]  # per kept feature: its extracted projection has a (possibly nonzero) bias
    table_bases: dict[int, Basis]  # kept feature k -> its basis (factorised tables only)
    layers: dict[str, int]  # Linear name -> rank of its new factorisation
    layer_bases: dict[str, Basis]  # Linear name -> its basis
    factor_activation: bool  # of the extracted structure


def lookup_columns(s, p: int, dims: list[int]) -> list[int]:
    """Table p's kept looked-up columns: its kept embedding `dims`, then the columns past the embedding (the
    first-order weight of DeepFM and Wide & Deep), always kept."""
    return list(dims) + list(range(s.table_dims[p], s.lookup_dims[p]))


def resolve_factoring(model, kept, bases, factor_activation, features: list[int], columns: list[list[int]],
                      rows: dict[str, list[int]]) -> FactorPlan:
    """The factorisation `kept.ranks` and `bases` ask for: `features` the kept tables (positions), `columns` their
    kept looked-up columns, `rows` every factorisable layer's kept output rows. ValueError (as DLRM's `extract`) for
    a rank of a unit the model cannot factorise (the head among them), a basis without a rank or of the wrong shape,
    a rank out of range, or a change of `factor_activation` on a model with factored layers."""
    s = model.structure
    names = s.feature_names
    shapes = s.linear_shapes()
    unknown = sorted(set(kept.ranks) - set(shapes) - set(names))
    if unknown:
        raise ValueError(f"Kept ranks name tables or Linear layers the model cannot factorise: {unknown[:5]} (tables "
                         f"{names[:4]}…, factorisable layers {list(shapes)[:6]}; the head `{s.logit_layer}` never is)")
    bases = dict(bases or {})
    unranked = sorted(set(bases) - set(kept.ranks))
    if unranked:
        raise ValueError(f"bases given for {unranked[:5]}, which kept.ranks does not factorise "
                         f"(a basis needs a rank: kept.ranks[name] = r)")

    projected = set(s.projected())
    stored, factorised, projection_bias, table_bases = [], [], [], {}
    for k, (p, cols) in enumerate(zip(features, columns)):
        name = names[p]
        width = min(s.stored_dims[p], len(cols))  # a projection wider than its kept output is multiplied in
        rank = kept.ranks.get(name)
        if rank is not None and not 1 <= int(rank) <= len(cols):
            raise ValueError(f"rank of table {name} must lie in [1, {len(cols)}] (its kept looked-up columns), "
                             f"got {rank}")
        cut = rank is not None and int(rank) < width
        stored.append(int(rank) if cut else width)
        factorised.append(cut)
        if name in bases:
            _check_basis(name, bases[name], len(cols), int(rank))
            if cut:
                table_bases[k] = bases[name]
        if cut:
            projection_bias.append(k in table_bases and table_bases[k].mean is not None)
        else:  # a carried projection keeps its bias; one multiplied into its table goes
            projection_bias.append(s.projection_bias and p in projected and width < len(cols))

    if factor_activation is None:
        factor_activation = s.factor_activation
    factor_activation = bool(factor_activation)
    if s.layer_ranks is not None and factor_activation != s.factor_activation:
        raise ValueError(f"the model's factored layers {list(s.layer_ranks)[:3]} use factor_activation="
                         f"{s.factor_activation}; extraction cannot change it to {factor_activation}")
    layers = model.linear_layers()
    factorise, layer_bases = {}, {}
    for name in shapes:
        if name not in kept.ranks:
            continue
        if isinstance(layers[name], Factored) and s.factor_activation:
            raise ValueError(f"{name} is already factored with a ReLU between its factors "
                             "(factor_activation): it cannot be re-factorised")
        factorise[name] = int(kept.ranks[name])
        if name in bases:
            _check_basis(name, bases[name], len(rows[name]), factorise[name])
            layer_bases[name] = bases[name]
    return FactorPlan(columns=[list(c) for c in columns], stored=stored, factorised=factorised,
                      projection_bias=projection_bias, table_bases=table_bases, layers=factorise,
                      layer_bases=layer_bases, factor_activation=factor_activation)


def factored_structure(structure, s, factors: FactorPlan):
    """The extracted `structure` (built unfactorised from the kept parts) with the factorisation: the tables'
    stored widths, the new factorisations and the carried factored layers that still fit their pruned shape (one
    whose rank exceeds min(in, out) is multiplied back), no batch norm on a factored layer (folded in)."""
    ranks = fitted_layer_ranks(structure.linear_shapes(), factors.layers, s)
    norms = [n for n in structure.batch_norm or [] if n not in ranks]
    return dataclasses.replace(structure, table_ranks=list(factors.stored),
                               projection_bias=any(factors.projection_bias), layer_ranks=ranks or None,
                               factor_activation=factors.factor_activation if ranks else False,
                               batch_norm=norms or None)


def lookup_factors(model, name: str, columns: list[int], scale: Tensor | None
                   ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Table `name`'s kept looked-up `columns` as E = S Pᵀ + c: S (rows × w) stored, P (|columns| × w) its
    projection's kept output rows and c their bias, or None when E = S (no bias); a projection no wider than its
    input is multiplied into the table. `scale` (|columns|,) multiplies the kept columns (a compression gate)."""
    weight = model.sparse.tables[name].weight.detach()
    if scale is not None:
        scale = scale.to(weight.device)
    if name not in model.sparse.projections:
        weight = index(weight, 1, columns)
        return (weight if scale is None else weight * scale), None, None
    layer = model.sparse.projections[name]
    projection = index(layer.weight.detach(), 0, columns)
    bias = None if layer.bias is None else index(layer.bias.detach(), 0, columns)
    if scale is not None:
        projection = projection * scale[:, None]
        bias = None if bias is None else bias * scale
    if projection.shape[0] <= projection.shape[1]:
        table = weight @ projection.T
        return (table if bias is None else table + bias), None, None
    return weight.clone(), projection, bias  # clone: the extracted model owns fresh storage


def slice_tables(model, features: list[int], factors: FactorPlan, scales: list[Tensor | None] | None,
                 structure, state: dict[str, Tensor]) -> None:
    """Into `state`: every kept table (`features`) at its kept looked-up columns, factorised or its projection
    carried as the `FactorPlan` says, with its projection (and bias) where the extracted `structure` has one.
    `scales`: per kept feature, the gate on its kept columns (or None)."""
    names = model.structure.feature_names
    for k, p in enumerate(features):
        name = names[p]
        table, projection, bias = lookup_factors(model, name, factors.columns[k], None if scales is None else scales[k])
        if factors.factorised[k]:
            table, projection, bias = _factorise_table(table, projection, bias, factors.stored[k],
                                                       factors.table_bases.get(k))
        state[f"sparse.tables.{name}.weight"] = table
        if projection is not None:
            state[f"sparse.projections.{name}.weight"] = projection
            if structure.projection_bias:
                state[f"sparse.projections.{name}.bias"] = (
                    bias if bias is not None else projection.new_zeros(projection.shape[0]))
            elif bias is not None:  # the plan says no projection bias survives: a plan/extract mismatch
                raise AssertionError(f"projection of {name} has a bias the extracted structure lacks")


def layer_chain(model, name: str, rows: list[int], columns: list[int], structure, factors: FactorPlan,
                column_scale: Tensor | None = None) -> list[list[Tensor]]:
    """Linear `name` of `model` as the extracted `structure` stores it, as its [weight, bias] maps (one, or a
    factored layer's two): its kept output `rows` and input `columns` (those of its weight times `column_scale`,
    over its whole input, first), its batch norm folded in when it ends factored, factorised where `factors` says,
    a carried factored layer multiplied back where the structure stores it plain."""
    rank = structure.layer_rank(name)
    norm = model.batch_norms().get(name) if rank is not None else None
    chain = _chain(model.linear_layers()[name], norm)
    if column_scale is not None:
        chain[0][0] = chain[0][0] * column_scale.to(chain[0][0].device)
    chain = _select(chain, rows, columns)
    if name in factors.layers:
        chain = _factorise_layer(*_product(chain), rank, factors.layer_bases.get(name))
    elif rank is None and len(chain) == 2:  # a carried factored layer wider than its pruned shape
        chain = [list(_product(chain))]
    return chain


def store_layer(state: dict[str, Tensor], name: str, chain: list[list[Tensor]]) -> None:
    """A `layer_chain` into `state` under the layer's keys (`<name>.first` / `<name>.second` when factored)."""
    if len(chain) == 1:
        state[f"{name}.weight"], state[f"{name}.bias"] = chain[0]
    else:
        (state[f"{name}.first.weight"], state[f"{name}.first.bias"]), \
            (state[f"{name}.second.weight"], state[f"{name}.second.bias"]) = chain


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

    def layer(self, a: int, b: int, rank: int | None) -> None:
        """A Linear a -> b with bias, or (`rank`: the column of its constant rank r) a `Factored` a -> r -> b, its
        two Linears with bias (as `models.cost.measure` counts it)."""
        if rank is None:
            self.linear(a, b)
        else:
            self.linear(a, rank)
            self.linear(rank, b)

    def deep_and_head(self, first: int, deep: list[int], head_in: int | None, one: int,
                      ranks: list[int | None] | None = None) -> None:
        """The deep layers from column `first` (each with bias; `ranks[i]`, a rank's column, where layer i is
        factored), then the head → 1 with bias, reading `head_in` (None: the last deep layer's output, or `first`
        without one)."""
        previous = first
        for i, col in enumerate(deep):
            self.layer(previous, col, None if ranks is None else ranks[i])
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
    [dense (iff read), features], and the tables' cost (`_table_cost`).

    A factorised model (projected tables, factored layers) is costed as built: a factored layer as its two Linears
    (its rank a constant column), a projected table as rows·r params and its projection r -> kept looked-up width
    (2·r·width FLOPs, r·width params, + width of each with `projection_bias`). Its group sets are refused
    (`PartsFamily.group_sets`), so a factorised model is only ever costed whole (no set pruned)."""

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
            **self._table_tensors(s),
        )

    @staticmethod
    def _table_tensors(s) -> dict[str, Tensor]:
        """Per table (F,): 1 where stored unprojected, its rank where projected (else 0), and the projection's
        FLOPs and params per unit of its output width: 2·r (+ 1 with a bias), r (+ 1)."""
        projected = set(s.projected())
        bias = float(s.projection_bias)

        def per_table(fn):
            return torch.tensor([fn(f, r) if f in projected else 0.0 for f, r in enumerate(s.stored_dims)],
                                dtype=torch.float64)

        return dict(
            plain=torch.tensor([0.0 if f in projected else 1.0 for f in range(len(s.stored_dims))],
                               dtype=torch.float64),
            rank=per_table(lambda f, r: float(r)),
            proj_flops=per_table(lambda f, r: 2.0 * r + bias),
            proj_params=per_table(lambda f, r: r + bias),
        )

    @staticmethod
    def _table_cost(lookup, alive, c: SimpleNamespace):
        """(FLOPs (V,), params (V,)) of the tables: `lookup` (V, F) every table's kept looked-up width (0 for a dead
        one), `alive` (V | 1, F) 0/1. An unprojected table rows·width params; a projected one rows·r and its
        projection (class docstring)."""
        params = (lookup * c.plain) @ c.rows + (alive * c.rank) @ c.rows + lookup @ c.proj_params \
            + alive @ c.row_meta  # a live table's cost beyond its columns (`resource.table_row_weights`)
        return lookup @ c.proj_flops, params

    @staticmethod
    def _counts(kept, c: SimpleNamespace):
        """(V, S + constants): units kept per column of the width table (a dim group may be b dims)."""
        return c.cat([kept * c.widths, c.tile(c.consts, kept.shape[0])], 1)

    @staticmethod
    def _cost(cols, c: SimpleNamespace):
        """(V, 2) FLOPs, params of the `LinearTerms` over the width columns `cols`."""
        terms = c.cat([c.take(cols, c.left) * c.take(cols, c.right), c.take(cols, c.single)], 1)
        return terms @ c.coef
