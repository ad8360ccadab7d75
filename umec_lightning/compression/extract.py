"""From a learned `Kept` to models: the masked reference and the physically smaller DLRM.

`masked_copy` keeps every shape and zeroes what `Kept` removes, so the removed parts contribute nothing:
the reference that extraction must reproduce. `extract` does the surgery (Torch-Pruning style: sorted kept
indices, `index_select`, a fresh module built from a smaller `DLRMStructure`), so FLOPs and bytes measured
on its result are real. Indices in `Kept` use the numbering of the model they are applied to.

Layout of the top MLP's first input (what the column surgery follows):
  dot: [bottom_out (D columns), then one column per kept pair, in the structure's pair order]
  cat: [bottom_out (bottom[-1] columns), then each kept table's columns, in table order]

Table widths. Kept dims index a table's *output* columns (those the interaction sees); a projected table
E = S Pᵀ (S rows × r stored, P d × r) keeps them as rows of P. `kept.ranks[name] = r` caps the stored
width: a table whose kept columns E (rows × d') are wider than r is replaced by its rank-r truncated SVD,
E ≈ (E V_r) V_rᵀ, V_r the top-r eigenvectors of the Gram matrix EᵀE (d' × d', float64: never an SVD of
a 10 M-row table; memory O(rows·r)). Under `dot` V_rᵀ becomes the table's projection (every vector of T
needs the shared width); under `cat` it is folded into the top MLP's first layer (W_i -> W_i V_r): exact,
and cheaper than a projection. A carried-over projection whose kept output is no wider than its input is
multiplied into the table (rows × d' costs no more than rows × r, and the projection goes).

Bases (`extract(..., bases={name: Basis(U, mean)})`). A table's factorisation may use a given basis instead
of the Gram eigenvectors: V = U (d' × r, orthonormal columns) and mean μ (d',) give the stored table
E' = (E − μ) V and the projection weight V with bias μ (E ≈ E' Vᵀ + μ; the structure then has
`projection_bias`); folded under `cat`, W_i -> W_i V and over.layers.0's bias += W_i μ. A table whose rank
is not below its current stored width is left as it is (its basis only checked); a dropped table's is ignored.

Low-rank Linears. `kept.ranks[name] = r` for a Linear stores the layer, once pruned as `kept` says (kept
output rows, kept input columns, the `dot` gate and the table folds above applied: y = W x + b, W out × in),
as two Linears in -> r -> out (`Factored`): with a basis (U out × r, orthonormal columns, mean μ or None
meaning 0) first = (Uᵀ W, Uᵀ (b − μ)) and second = (U, μ), so y ≈ U Uᵀ (y − μ) + μ, exact when y − μ lies
in span(U). A basis is given in the *pruned* layer's output space: out = the extracted layer's rows (its kept
neurons; under `dot` the last bottom layer's rows are the kept dims), in the order of the kept indices.
Without a basis the default is the truncated SVD W ≈ U_r U_rᵀ W (U_r the top-r left singular vectors of W)
with the bias kept exactly (μ = b): y ≈ U_r U_rᵀ W x + b, the best rank-r approximation of W, exact at
r = rank(W) (so at r = min(in, out)). With `factor_activation` a ReLU sits between the factors (the paper's
variant, no longer exact: fine-tune). A layer of the input model that is already factored is carried as is
(its neurons and inputs may be pruned: rows of its second factor, columns of its first); named in
`kept.ranks` it is re-factorised from the product of its factors (refused under `factor_activation`), and one
whose rank exceeds min(in, out) after pruning is multiplied back into one Linear.

Batch norm (`structure.batch_norm`). A kept neuron keeps its batch-norm channel (scale, shift, running mean
and variance: `dense.norms.<i>` / `over.norms.<i>` indexed like the layer's rows). A layer that is factorised
has its batch norm folded into it first (eval-mode affine, `models.serve.folded_linear`): the factorisation is
of the weights a server runs, and the factored layer carries no batch norm. Dropout settings carry over by
layer name.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..models.dlrm import DLRM, Factored, input_linear, output_linear
from ..models.family import family_of_model
from ..models.serve import folded_linear
from ..models.structure import DLRMStructure
from .kept import Kept

__all__ = ["Basis", "apply_kept_masks_", "dlrm_extract", "dlrm_extracted_structure", "extract", "extracted_fractions",
           "extracted_structure", "masked_copy"]

ORTHONORMAL_ATOL = 1e-4  # max |UᵀU − I| accepted for a basis (float32 eigenvectors are ~1e-6 off)


@dataclass(frozen=True)
class Basis:
    """An output basis for a factorisation (see the module docstring).

    U:    (out × r) float tensor with orthonormal columns; out = the pruned Linear's output rows, or the
          kept columns d' of a table (its width entering the interaction), r = the Kept rank.
    mean: (out,) float tensor μ the basis is centred on, or None (μ = 0).
    """

    U: Tensor
    mean: Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.U.shape[1])


def _check_basis(name: str, basis, out: int, rank: int) -> None:
    if not isinstance(basis, Basis):
        raise ValueError(f"basis of {name} must be an extract.Basis, got {type(basis).__name__}")
    u = basis.U
    if not isinstance(u, Tensor) or u.dim() != 2 or not u.is_floating_point():
        raise ValueError(f"basis of {name}: U must be a 2-D float tensor (out × r), got "
                         f"{type(u).__name__ if not isinstance(u, Tensor) else (tuple(u.shape), u.dtype)}")
    if tuple(u.shape) != (out, rank):
        raise ValueError(f"basis of {name}: U has shape {tuple(u.shape)}, expected ({out}, {rank}) "
                         f"(out = its extracted width, r = kept.ranks[{name!r}])")
    if basis.mean is not None:
        m = basis.mean
        if not isinstance(m, Tensor) or not m.is_floating_point() or tuple(m.shape) != (out,):
            shape = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
            raise ValueError(f"basis of {name}: mean must be a float tensor of shape ({out},), got {shape}")
        if not torch.isfinite(m).all():
            raise ValueError(f"basis of {name}: mean has non-finite entries")
    if u.device.type == "meta":
        return
    if not torch.isfinite(u).all():
        raise ValueError(f"basis of {name}: U has non-finite entries")
    ud = u.detach().double()
    err = (ud.T @ ud - torch.eye(rank, dtype=torch.float64, device=ud.device)).abs().max().item()
    if not err <= ORTHONORMAL_ATOL:
        raise ValueError(f"basis of {name}: U's columns are not orthonormal (max |UᵀU − I| = {err:.3g})")


@dataclass(frozen=True)
class _Plan:
    """A `Kept` resolved against one model: sorted, validated, in that model's numbering."""

    use_dense: bool
    features: list[int]  # kept positions in the model's tables (sorted)
    dims: list[list[int]]  # per kept feature: kept table columns (sorted, non-empty)
    neurons: dict[str, list[int]]  # every Linear name -> kept output rows as Kept says (logit: all)
    rows: dict[str, list[int]]  # every Linear name -> output rows of the extracted layer
    pairs: list[tuple[int, int]]  # dot: surviving kept pairs, old T numbering, in the model's pair order
    stored: list[int]  # per kept feature: stored width of the extracted table
    factorised: list[bool]  # per kept feature: replaced by a truncated SVD (stored < its current width)
    folded: list[bool]  # per kept feature: `cat` and factorised, the projection folded into over.layers.0
    projection_bias: list[bool]  # per kept feature: its extracted projection has a (possibly nonzero) bias
    factorise: dict[str, int] = field(default_factory=dict)  # Linear name -> rank of its new factorisation
    table_bases: dict[int, Basis] = field(default_factory=dict)  # kept feature k -> its basis (factorised)
    layer_bases: dict[str, Basis] = field(default_factory=dict)  # Linear name -> its basis
    factor_activation: bool = False  # of the extracted structure

    def out_dim(self, k: int) -> int:
        """Width of kept feature k's vector in the extracted model."""
        return self.stored[k] if self.folded[k] else len(self.dims[k])


def _sorted_indices(values, size: int, what: str) -> list[int]:
    out = sorted({int(v) for v in values})
    if out and (out[0] < 0 or out[-1] >= size):
        raise ValueError(f"{what}: indices must lie in [0, {size}), got {out[0]}..{out[-1]}")
    return out


def _resolve(model: DLRM, kept: Kept, bases: dict | None = None, factor_activation: bool | None = None) -> _Plan:
    s = model.structure
    layers = model.linear_layers()
    logit = f"over.layers.{len(s.top) - 1}"
    unknown_units = sorted(set(kept.ranks) - set(layers) - set(s.feature_names))
    if unknown_units:
        raise ValueError(f"Kept ranks name tables or Linear layers the model does not have: {unknown_units[:5]} "
                         f"(tables {s.feature_names[:4]}…, layers {list(layers)})")
    bases = dict(bases or {})
    unranked = sorted(set(bases) - set(kept.ranks))
    if unranked:
        raise ValueError(f"bases given for {unranked[:5]}, which kept.ranks does not factorise "
                         f"(a basis needs a rank: kept.ranks[name] = r)")

    if kept.use_dense and not s.use_dense:
        raise ValueError("Kept keeps the dense block, but the model does not read it")
    use_dense = bool(kept.use_dense) and s.use_dense

    position = {fid: pos for pos, fid in enumerate(s.feature_ids)}
    unknown = [f for f in kept.feature_ids if f not in position]
    if unknown:
        raise ValueError(f"Kept feature ids {unknown[:5]} are not read by the model ({s.feature_ids})")
    features = sorted({position[f] for f in kept.feature_ids})

    neurons: dict[str, list[int]] = {}
    for name, layer in layers.items():
        if name == logit:
            if name in kept.neurons:
                raise ValueError(f"{name} is the logit layer; its single output cannot be pruned")
            neurons[name] = [0]
            continue
        neurons[name] = _sorted_indices(kept.neurons.get(name, range(layer.out_features)),
                                        layer.out_features, f"neurons of {name}")
    extra = sorted(set(kept.neurons) - set(layers))
    if extra:
        raise ValueError(f"Kept names Linear layers the model does not have: {extra}")
    rows = dict(neurons)

    names = s.feature_names
    pairs: list[tuple[int, int]] = []
    if s.interaction == "dot":
        last = f"dense.layers.{len(s.bottom) - 1}"
        if not features and not kept.dims and use_dense and last in kept.neurons:
            # Every table is gone: no table carries the kept dims any more, the bottom output's kept rows do
            # (`kept_from_masks` writes the dim mask there); all D of them would undo the dim pruning.
            shared = _sorted_indices(kept.neurons[last], s.dim, f"neurons of {last}")
        else:
            shared = _dot_dims(kept, [names[p] for p in features] or list(kept.dims), s.dim)
        if not shared:
            raise ValueError("Kept keeps no embedding dimension under `dot`: nothing left to interact")
        dims = [shared] * len(features)
        if s.use_dense:
            # Under `dot` the bottom output *is* the shared dim: its rows follow the kept dims. A kept dim
            # whose bottom neuron was pruned keeps a zero row (see `extract`).
            rows[f"dense.layers.{len(s.bottom) - 1}"] = shared
        alive = {0} if use_dense else set()
        first = int(s.use_dense)
        alive |= {first + p for p in features}
        model_pairs = s.kept_pairs()
        wanted = set(model_pairs) if kept.pairs is None else {(int(i), int(j)) for i, j in kept.pairs}
        unknown_pairs = sorted(wanted - set(model_pairs))
        if unknown_pairs:
            raise ValueError(f"Kept pairs {unknown_pairs[:3]} are not interaction pairs of the model")
        pairs = [(i, j) for i, j in model_pairs if (i, j) in wanted and i in alive and j in alive]
    else:
        dims, kept_features = [], []
        for p in features:
            d = _sorted_indices(kept.dims.get(names[p], range(s.table_dims[p])), s.table_dims[p],
                                f"dims of table {names[p]}")
            if d:  # a table with no kept column contributes nothing: drop it with its feature
                kept_features.append(p)
                dims.append(d)
        features = kept_features

    if use_dense:
        empty = [n for n in layers if n.startswith("dense.") and not rows[n]]
        if empty:
            raise ValueError(f"{empty[0]} keeps no neuron; drop the dense block instead (use_dense=False)")
    empty = [n for n in layers if n.startswith("over.") and not rows[n]]
    if empty:
        raise ValueError(f"{empty[0]} keeps no neuron: the top MLP would be cut")
    stored, factorised = _resolve_ranks(s, kept, features, dims)
    folded = [f and s.interaction == "cat" for f in factorised]

    table_bases: dict[int, Basis] = {}
    for k, p in enumerate(features):
        name = names[p]
        if name in bases:
            _check_basis(name, bases[name], len(dims[k]), int(kept.ranks[name]))
            if factorised[k]:
                table_bases[k] = bases[name]
    projected = set(s.projected())
    projection_bias = []
    for k, p in enumerate(features):
        if folded[k]:
            projection_bias.append(False)
        elif factorised[k]:
            projection_bias.append(k in table_bases and table_bases[k].mean is not None)
        else:  # a carried projection keeps its bias; one multiplied into its table goes
            projection_bias.append(s.projection_bias and p in projected and stored[k] < len(dims[k]))

    if factor_activation is None:
        factor_activation = s.factor_activation
    factor_activation = bool(factor_activation)
    if s.layer_ranks is not None and factor_activation != s.factor_activation:
        raise ValueError(f"the model's factored layers {list(s.layer_ranks)[:3]} use factor_activation="
                         f"{s.factor_activation}; extraction cannot change it to {factor_activation}")
    factorise: dict[str, int] = {}
    layer_bases: dict[str, Basis] = {}
    for name in layers:
        if name not in kept.ranks:
            continue
        if name.startswith("dense.") and not use_dense:
            raise ValueError(f"Kept ranks factorise {name}, but Kept drops the dense block")
        if isinstance(layers[name], Factored) and s.factor_activation:
            raise ValueError(f"{name} is already factored with a ReLU between its factors "
                             "(factor_activation): it cannot be re-factorised")
        factorise[name] = int(kept.ranks[name])
        if name in bases:
            _check_basis(name, bases[name], len(rows[name]), factorise[name])
            layer_bases[name] = bases[name]
    return _Plan(use_dense=use_dense, features=features, dims=dims, neurons=neurons, rows=rows, pairs=pairs,
                 stored=stored, factorised=factorised, folded=folded, projection_bias=projection_bias,
                 factorise=factorise, table_bases=table_bases, layer_bases=layer_bases,
                 factor_activation=factor_activation)


def _resolve_ranks(s: DLRMStructure, kept: Kept, features: list[int], dims: list[list[int]]):
    """Stored width of each kept table and whether it is factorised (see the module docstring)."""
    names = s.feature_names
    stored, factorised = [], []
    for p, d in zip(features, dims):
        width = min(s.stored_dims[p], len(d))  # a projection wider than its kept output is multiplied in
        rank = kept.ranks.get(names[p])
        if rank is not None and not 1 <= int(rank) <= len(d):
            raise ValueError(f"rank of table {names[p]} must lie in [1, {len(d)}] (its kept dims), got {rank}")
        if rank is not None and int(rank) < width:
            stored.append(int(rank))
            factorised.append(True)
        else:
            stored.append(width)
            factorised.append(False)
    return stored, factorised


def _dot_dims(kept: Kept, names: list[str], dim: int) -> list[int]:
    """The shared `dot` dims: every kept table must keep the same columns."""
    lists = {tuple(_sorted_indices(kept.dims[n], dim, f"dims of table {n}")) for n in names if n in kept.dims}
    if len(lists) > 1:
        raise ValueError(f"`dot` needs one shared list of kept dims for every table, got {len(lists)} lists")
    return list(lists.pop()) if lists else list(range(dim))


def _new_structure(s: DLRMStructure, plan: _Plan) -> DLRMStructure:
    pairs = None
    if s.interaction == "dot":
        old_rows = ([0] if plan.use_dense else []) + [int(s.use_dense) + p for p in plan.features]
        renumber = {old: new for new, old in enumerate(old_rows)}
        pairs = [(renumber[i], renumber[j]) for i, j in plan.pairs]
    structure = DLRMStructure(
        sparse_names=list(s.sparse_names),
        feature_ids=[s.feature_ids[p] for p in plan.features],
        table_sizes=[s.table_sizes[p] for p in plan.features],
        table_dims=[plan.out_dim(k) for k in range(len(plan.features))],
        table_ranks=list(plan.stored),
        num_dense=s.num_dense,
        bottom=[len(plan.rows[f"dense.layers.{i}"]) for i in range(len(s.bottom))] if plan.use_dense else [],
        top=[len(plan.rows[f"over.layers.{i}"]) for i in range(len(s.top))],
        interaction=s.interaction,
        self_interaction=s.self_interaction,
        use_dense=plan.use_dense,
        pairs=pairs,
        dense_names=list(s.dense_names),
        projection_bias=any(plan.projection_bias),
    )
    if pairs is not None and pairs == structure.all_pairs():
        structure.pairs = None  # the reference order, stated as such
    # Factored layers: the new factorisations, and the carried ones that still fit their pruned shape.
    ranks = fitted_layer_ranks(structure.linear_shapes(), plan.factorise, s)
    if ranks:
        structure = dataclasses.replace(structure, layer_ranks=ranks, factor_activation=plan.factor_activation)
    # Batch norm stays on the hidden layers that remain plain (a factorised layer has it folded in, `extract`).
    hidden = set(structure.hidden_names())
    norms = [n for n in s.batch_norm or [] if n in hidden and structure.layer_rank(n) is None]
    rates = {n: p for n, p in (s.dropout or {}).items() if n in hidden}
    if norms or rates:
        structure = dataclasses.replace(structure, batch_norm=norms, dropout=rates)
    return structure


def fitted_layer_ranks(shapes: dict[str, tuple[int, int]], new: dict[str, int], s) -> dict[str, int]:
    """{layer: rank} of an extracted structure with Linears `shapes` ({name: (in, out)}): the new factorisations
    `new` (each within [1, min(in, out)]) and the layers the source structure `s` had factored that still fit their
    pruned shape. A carried rank wider than its pruned layer is multiplied back into one Linear (`extract`), unless a
    ReLU sits between its factors (ValueError)."""
    ranks: dict[str, int] = {}
    for name, (n_in, n_out) in shapes.items():
        if name in new:
            r = new[name]
            if not 1 <= r <= min(n_in, n_out):
                raise ValueError(f"Kept rank {r} of {name} must lie in [1, {min(n_in, n_out)}] = [1, min(in, out)] "
                                 f"of the extracted layer ({n_in} -> {n_out})")
            ranks[name] = r
        elif s.layer_rank(name) is not None:
            r = s.layer_rank(name)
            if r <= min(n_in, n_out):
                ranks[name] = r
            elif s.factor_activation:
                raise ValueError(f"{name} is factored at rank {r} with a ReLU between its factors, more than "
                                 f"min(in, out) = {min(n_in, n_out)} of the pruned layer ({n_in} -> {n_out}): "
                                 "it can neither stay factored nor be multiplied back")
    return ranks


def extracted_structure(model, kept: Kept, bases: dict[str, Basis] | None = None, *,
                        factor_activation: bool | None = None):
    """The structure `extract(model, kept, bases, factor_activation=...)` builds, without touching any weight, as
    `model`'s family says (`models.family`; DLRM's: `dlrm_extracted_structure`)."""
    return family_of_model(model).extracted_structure(model, kept, bases, factor_activation=factor_activation)


def dlrm_extracted_structure(model: DLRM, kept: Kept, bases: dict[str, Basis] | None = None, *,
                             factor_activation: bool | None = None) -> DLRMStructure:
    """The structure `dlrm_extract(model, kept, bases, factor_activation=...)` builds, without touching any weight."""
    return _new_structure(model.structure, _resolve(model, kept, bases, factor_activation))


def _top_input_columns(model: DLRM, plan: _Plan) -> list[int]:
    """Columns of over.layers.0's input that the extracted model keeps, in its new input order."""
    s = model.structure
    cols = list(plan.rows[f"dense.layers.{len(s.bottom) - 1}"]) if plan.use_dense else []
    head = s.bottom_out
    if s.interaction == "dot":
        column = {pair: head + k for k, pair in enumerate(s.kept_pairs())}
        return cols + [column[p] for p in plan.pairs]
    offsets = [head]
    for d in s.table_dims:
        offsets.append(offsets[-1] + d)
    for p, dims in zip(plan.features, plan.dims):
        cols += [offsets[p] + j for j in dims]
    return cols


def _index(t: Tensor, dim: int, keep: list[int]) -> Tensor:
    return t.index_select(dim, torch.tensor(keep, dtype=torch.long, device=t.device))


@torch.no_grad()
def extract(model, kept: Kept, bases: dict[str, Basis] | None = None, *, factor_activation: bool | None = None):
    """The physically smaller model `kept` describes, built by `model`'s family's surgery (`models.family`;
    DLRM's: `dlrm_extract`)."""
    return family_of_model(model).extract(model, kept, bases, factor_activation=factor_activation)


def dlrm_extract(model: DLRM, kept: Kept, bases: dict[str, Basis] | None = None, *,
                 factor_activation: bool | None = None) -> DLRM:
    """The physically smaller DLRM: dropped tables and pairs gone, narrower tables, smaller Linears.

    Its outputs equal `masked_copy(model, kept)`'s. Under `dot`, a dim gate on `model` is folded in:
    |gate| into the kept table columns and the bottom MLP's last rows (ReLU commutes with a factor ≥ 0;
    every pair product sees gate² = |gate|²), and sign(gate) into the top MLP's bottom-output columns.
    `kept.ranks` factorise tables and Linear layers (module docstring), which masks cannot express: the
    outputs then equal those of the masked model of the same Kept without ranks when each rank reaches its
    unit's rank (a table's kept columns, a layer's W; for a layer with a basis: when its pruned outputs minus
    the mean lie in span(U)). `bases` {table or Linear name: Basis} replace the default bases of the units
    that `kept.ranks` names (r must equal the rank; the basis lives in the *pruned* unit's output space, see
    the module docstring). `factor_activation` (None: the model's) sets the extracted structure's flag: with
    True a ReLU sits between the factors of every factored layer (not exact; fine-tune); it cannot change the
    flag of a model that already has factored layers.
    The result has no gate, fresh parameters (nothing shared with `model`), the same sparse-gradient
    flag, device, dtype and train/eval mode.
    """
    s = model.structure
    plan = _resolve(model, kept, bases, factor_activation)
    structure = _new_structure(s, plan)
    layers = model.linear_layers()
    norms = model.batch_norms()
    gate = model.dim_gate.detach() if model.dim_gate is not None else None
    state: dict[str, Tensor] = {}

    names = s.feature_names
    folds: dict[int, tuple[Tensor, Tensor | None]] = {}  # kept feature k -> (V, μ) to fold into over.layers.0
    for k, (p, dims) in enumerate(zip(plan.features, plan.dims)):
        table, projection, bias = _kept_factors(model, names[p], dims, gate)
        if plan.factorised[k]:
            table, projection, bias = _factorise_table(table, projection, bias, plan.stored[k],
                                                       plan.table_bases.get(k))
            if plan.folded[k]:
                folds[k], projection, bias = (projection, bias), None, None
        state[f"sparse.tables.{names[p]}.weight"] = table
        if projection is not None:
            state[f"sparse.projections.{names[p]}.weight"] = projection
            if structure.projection_bias:
                state[f"sparse.projections.{names[p]}.bias"] = (
                    bias if bias is not None else projection.new_zeros(projection.shape[0]))
            elif bias is not None:  # the plan says no projection bias survives: a plan/extract mismatch
                raise AssertionError(f"projection of {names[p]} has a bias the extracted structure lacks")

    chains: dict[str, list[list[Tensor]]] = {}
    previous = list(range(s.num_dense))
    for i in (range(len(s.bottom)) if plan.use_dense else ()):
        name = f"dense.layers.{i}"
        rows = plan.rows[name]
        chain = _select(_chain(layers[name], norms.get(name) if name in plan.factorise else None), rows, previous)
        if i == len(s.bottom) - 1 and s.interaction == "dot":
            pruned = set(rows) - set(plan.neurons[name])
            scale = torch.tensor([0.0 if r in pruned else 1.0 for r in rows], dtype=chain[-1][0].dtype,
                                 device=chain[-1][0].device)
            if gate is not None:
                scale = scale * _index(gate, 0, rows).abs()
            chain[-1] = [chain[-1][0] * scale[:, None], chain[-1][1] * scale]
        chains[name] = chain
        previous = rows

    previous = _top_input_columns(model, plan)
    for i in range(len(s.top)):
        name = f"over.layers.{i}"
        rows = plan.rows[name]
        chain = _select(_chain(layers[name], norms.get(name) if name in plan.factorise else None), rows, previous)
        weight, bias = chain[0]
        if i == 0 and gate is not None and plan.use_dense:
            width = len(plan.rows[f"dense.layers.{len(s.bottom) - 1}"])
            sign = torch.ones(weight.shape[1], dtype=weight.dtype, device=weight.device)
            sign[:width] = _index(gate, 0, plan.rows[f"dense.layers.{len(s.bottom) - 1}"]).sign()
            weight = weight * sign
        if i == 0 and folds:
            head = len(plan.rows[f"dense.layers.{len(s.bottom) - 1}"]) if plan.use_dense else 0
            weight, bias = _fold_projections(weight, bias, plan, folds, head)
        chain[0] = [weight, bias]
        chains[name] = chain
        previous = rows

    for name, chain in chains.items():
        rank = structure.layer_rank(name)
        if name in plan.factorise:
            chain = _factorise_layer(*_product(chain), rank, plan.layer_bases.get(name))
        elif rank is None and len(chain) == 2:  # a carried factored layer wider than its pruned shape
            chain = [list(_product(chain))]
        if rank is None:
            state[f"{name}.weight"], state[f"{name}.bias"] = chain[0]
        else:
            (state[f"{name}.first.weight"], state[f"{name}.first.bias"]), \
                (state[f"{name}.second.weight"], state[f"{name}.second.bias"]) = chain
        if structure.has_batch_norm(name):  # the kept neurons' channels
            state.update(_norm_state(norms[name], name, plan.rows[name]))

    return _build(structure, state, model)


def _norm_state(norm, name: str, rows: list[int]) -> dict[str, Tensor]:
    """The state of `norm` (the batch norm after Linear `name`) restricted to channels `rows`, fresh copies."""
    prefix = name.replace(".layers.", ".norms.")
    return {f"{prefix}.{key}": value.detach().clone() if value.dim() == 0 else _index(value.detach(), 0, rows)
            for key, value in norm.state_dict().items()}


def _chain(layer, norm=None) -> list[list[Tensor]]:
    """A layer as its list of [weight, bias] maps (one, or a factored layer's two), fresh copies; a batch norm
    `norm` after it is folded into the last map."""
    maps = [layer.first, layer.second] if isinstance(layer, Factored) else [layer]
    return [list(folded_linear(m, norm if k == len(maps) - 1 else None)) for k, m in enumerate(maps)]


def _select(chain: list[list[Tensor]], rows: list[int], columns: list[int]) -> list[list[Tensor]]:
    """Keep output `rows` (rows of the last map) and input `columns` (columns of the first map)."""
    chain[-1] = [_index(chain[-1][0], 0, rows), _index(chain[-1][1], 0, rows)]
    chain[0] = [_index(chain[0][0], 1, columns), chain[0][1]]
    return chain


def _product(chain: list[list[Tensor]]) -> tuple[Tensor, Tensor]:
    """(W, b) of the affine map a chain computes (no activation between its maps)."""
    if len(chain) == 1:
        return chain[0][0], chain[0][1]
    (a, a_bias), (b, b_bias) = chain
    weight = (b.double() @ a.double()).to(a.dtype)
    bias = (b.double() @ a_bias.double() + b_bias.double()).to(a.dtype)
    return weight, bias


def _signed(v: Tensor) -> Tensor:
    """Columns with their largest-magnitude entry made positive (SVD/eigh signs are arbitrary)."""
    sign = v.gather(0, v.abs().argmax(0, keepdim=True)).sign()
    return v * torch.where(sign == 0, torch.ones_like(sign), sign)


def _factorise_layer(weight: Tensor, bias: Tensor, rank: int, basis: Basis | None) -> list[list[Tensor]]:
    """y = W x + b as [[Uᵀ W, Uᵀ (b − μ)], [U, μ]] (module docstring); no basis: U the top-`rank` left singular
    vectors of W and μ = b (the truncated SVD with the bias kept exactly)."""
    w, b = weight.double(), bias.double()
    if basis is None:
        u = _signed(torch.linalg.svd(w, full_matrices=False)[0][:, :rank])
        mean = b
    else:
        u = basis.U.detach().to(device=w.device, dtype=torch.float64)
        mean = torch.zeros_like(b) if basis.mean is None else basis.mean.detach().to(w.device, torch.float64)
    dtype = weight.dtype
    return [[(u.T @ w).to(dtype), (u.T @ (b - mean)).to(dtype)], [u.to(dtype).contiguous(), mean.to(dtype).clone()]]


def _kept_factors(model: DLRM, name: str, dims: list[int], gate: Tensor | None
                  ) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Table `name`'s kept columns as E = S Pᵀ + c: S (rows × w) stored, P (d' × w) its projection's kept
    output rows and c (d',) its bias, or None when E = S (no bias). A `dot` gate scales the kept columns by
    |gate| (see `extract`)."""
    weight = model.sparse.tables[name].weight.detach()
    scale = None if gate is None else _index(gate, 0, dims).abs()
    if name not in model.sparse.projections:
        weight = _index(weight, 1, dims)
        return (weight if scale is None else weight * scale), None, None
    layer = model.sparse.projections[name]
    projection = _index(layer.weight.detach(), 0, dims)
    bias = None if layer.bias is None else _index(layer.bias.detach(), 0, dims)
    if scale is not None:
        projection = projection * scale[:, None]
        bias = None if bias is None else bias * scale
    if projection.shape[0] <= projection.shape[1]:  # no wider than its input: multiply it into the table
        table = weight @ projection.T
        return (table if bias is None else table + bias), None, None
    return weight.clone(), projection, bias  # clone: the extracted model owns fresh storage


GRAM_CHUNK = 1 << 16  # rows per float64 block of the Gram matrix: O(chunk·w) extra memory, whatever the rows


def table_gram(weight: Tensor) -> Tensor:
    """SᵀS (w × w) in float64, accumulated over row blocks (no float64 copy of a 10 M-row table)."""
    gram = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64, device=weight.device)
    for block in weight.split(GRAM_CHUNK):
        block = block.double()
        gram += block.T @ block
    return gram


def _column_sums(weight: Tensor) -> Tensor:
    """Sᵀ1 (w,) in float64, over row blocks."""
    total = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
    for block in weight.split(GRAM_CHUNK):
        total += block.double().sum(0)
    return total


def _factorise_table(table: Tensor, projection: Tensor | None, bias: Tensor | None, rank: int,
                     basis: Basis | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Rank-`rank` factorisation of E = table · projectionᵀ + bias (projection None: E = table), rows × d'.

    Basis V (d' × r) and mean μ: the given basis, else the top-r eigenvectors of EᵀE (eigenvalues descending:
    the right singular vectors, the truncated SVD E ≈ (E V_r) V_rᵀ) and μ = None. Returns
    ((E − μ) V (rows × r), V (d' × r), μ); (E − μ) V = S (Pᵀ V) + 1 (c − μ)ᵀ V is formed without E.
    """
    if basis is None:
        gram = table_gram(table)
        if projection is not None:
            p = projection.double()
            gram = p @ gram @ p.T  # EᵀE = P (SᵀS) Pᵀ (+ the bias terms)
            if bias is not None:
                c, ps = bias.double(), p @ _column_sums(table)
                gram = gram + torch.outer(ps, c) + torch.outer(c, ps) + table.shape[0] * torch.outer(c, c)
        _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
        v = _signed(vectors[:, -rank:].flip(1))
        mean = None
    else:
        v = basis.U.detach().to(device=table.device, dtype=torch.float64)
        mean = None if basis.mean is None else basis.mean.detach().to(table.device, torch.float64)
    mix = v if projection is None else projection.double().T @ v  # (w × r)
    out = table @ mix.to(table.dtype)
    if bias is not None or mean is not None:
        centre = torch.zeros(v.shape[0], dtype=torch.float64, device=v.device)
        if bias is not None:
            centre = centre + bias.double()
        if mean is not None:
            centre = centre - mean
        out = out + (centre @ v).to(table.dtype)
    return out, v.to(table.dtype).contiguous(), None if mean is None else mean.to(table.dtype)


def _fold_projections(weight: Tensor, bias: Tensor, plan: _Plan, folds: dict[int, tuple[Tensor, Tensor | None]],
                      head: int) -> tuple[Tensor, Tensor]:
    """over.layers.0's (first map's) weight (out × new input, kept columns selected) and bias, with each folded
    table's block of d' columns W_k replaced by its r columns W_k V_r, and W_k μ added to the bias (`cat`: the
    table now feeds its r-wide vector directly)."""
    blocks, start = [weight[:, :head]], head
    for k, dims in enumerate(plan.dims):
        block = weight[:, start : start + len(dims)]
        if k in folds:
            v, mean = folds[k]
            if mean is not None:
                bias = bias + block @ mean
            block = block @ v
        blocks.append(block)
        start += len(dims)
    return torch.cat(blocks, dim=1), bias


def _build(structure: DLRMStructure, state: dict[str, Tensor], like: DLRM) -> DLRM:
    """A fresh DLRM owning `state` (fresh tensors), placed and moded like `like`."""
    reference = next(like.parameters())
    out = DLRM(structure, sparse_grad=like.sparse_grad)
    # Every tensor in `state` comes out of index_select or a product: fresh storage, safe to assign.
    out.load_state_dict({k: v.detach() for k, v in state.items()}, strict=True, assign=True)
    out.to(device=reference.device)
    out.train(like.training)
    return out


def apply_kept_masks_(model: DLRM, kept: Kept) -> DLRM:
    """Zero, in place, everything `kept` removes, keeping every shape (the reference for `extract`).

    Pruned hidden neurons: weight row and bias zeroed (of a factored layer: of its second factor), and the scale
    and shift of their batch-norm channel where the layer has one. Dropped
    feature: its top-input columns (`cat`), or the columns of every pair touching it (`dot`). Dropped dense
    block: the bottom-output columns, and under `dot` every pair touching T row 0. Pruned `cat` dim: its
    top-input column. Pruned `dot` dim: the dim gate's entry set to 0 (the gate is created if absent).
    Pruned pair: its top-input column.
    Under `dot` this may add a parameter (the gate): prefer `masked_copy` for a model an optimizer holds.
    """
    s = model.structure
    if kept.ranks:
        raise ValueError(
            f"Kept ranks {dict(list(kept.ranks.items())[:3])} ask for a factorisation, which masks cannot express: "
            "use extract(model, kept), or a Kept without ranks for masking"
        )
    _resolve(model, kept)  # validation only: the masks below read `kept` directly, independently of extract
    layers = model.linear_layers()
    kept_ids = {int(f) for f in kept.feature_ids}
    head = s.bottom_out
    dead_columns: set[int] = set()
    if not kept.use_dense:
        dead_columns |= set(range(head))
    if s.interaction == "cat":
        offset = head
        for fid, name, width in zip(s.feature_ids, s.feature_names, s.table_dims):
            keep = set(kept.dims.get(name, range(width))) if fid in kept_ids else set()
            dead_columns |= {offset + j for j in range(width) if j not in keep}
            offset += width
    else:
        first = int(s.use_dense)
        dead_rows = {0} if s.use_dense and not kept.use_dense else set()
        dead_rows |= {first + pos for pos, fid in enumerate(s.feature_ids) if fid not in kept_ids}
        wanted = None if kept.pairs is None else {(int(i), int(j)) for i, j in kept.pairs}
        for k, (i, j) in enumerate(s.kept_pairs()):
            if i in dead_rows or j in dead_rows or (wanted is not None and (i, j) not in wanted):
                dead_columns.add(head + k)
        names = [n for fid, n in zip(s.feature_ids, s.feature_names) if fid in kept_ids] or list(kept.dims)
        shared = set(_dot_dims(kept, names, s.dim))
        removed = [j for j in range(s.dim) if j not in shared]
        if removed:
            gate = model.enable_dim_gate()
            with torch.no_grad():
                gate[removed] = 0.0

    with torch.no_grad():
        norms = model.batch_norms()
        for name, rows in kept.neurons.items():
            layer = output_linear(layers[name])  # a factored layer's outputs are its second factor's rows
            keep = set(rows)
            removed = [r for r in range(layer.out_features) if r not in keep]
            layer.weight[removed] = 0.0
            layer.bias[removed] = 0.0
            if name in norms:  # the batch norm would turn the zero rows into its shift β: zero γ and β too
                norms[name].weight[removed] = 0.0
                norms[name].bias[removed] = 0.0
        if dead_columns:
            input_linear(layers["over.layers.0"]).weight[:, sorted(dead_columns)] = 0.0
    return model


def masked_copy(model: DLRM, kept: Kept) -> DLRM:
    """A deep copy of `model` with `apply_kept_masks_` applied: same shapes, removed parts contributing nothing."""
    return apply_kept_masks_(copy.deepcopy(model), kept)


def extracted_fractions(model: DLRM, kept: Kept, bases: dict[str, Basis] | None = None) -> dict[str, float]:
    """FLOPs and params of the model `extract(model, kept, bases)` would build, as fractions of `model`'s (a
    table's params priced by `resource.table_param_weights` while a bytes budget sets them),
    measured on meta-device DLRMs of the structures (no weight is touched or allocated: sizing Kaggle tables
    is free). `bases` only matter through their means (a projection bias costs d params and FLOPs)."""
    from ..models.cost import measure
    from .resource import table_param_weights, table_row_weights

    family = family_of_model(model)
    weights, row_meta = table_param_weights(model) or {}, table_row_weights(model) or {}

    def cost(m) -> tuple[float, float]:
        """FLOPs and params, a table's params priced as `table_param_weights` says (1 each without it), plus its
        rows' cost as a live table (`table_row_weights`)."""
        c = measure(m)
        extra = sum((weights.get(name, 1.0) - 1.0) * t.weight.numel() + row_meta.get(name, 0.0) * t.num_embeddings
                    for name, t in m.sparse.tables.items())
        return c.flops, c.params + extra

    with torch.device("meta"):
        base = cost(family.build(extracted_structure(model, Kept.everything(model)), sparse_grad=False))
        small = cost(family.build(extracted_structure(model, kept, bases), sparse_grad=False))
    return {"flops": small[0] / base[0], "params": small[1] / base[1]}
