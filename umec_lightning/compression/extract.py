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
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.dlrm import DLRM
from ..models.structure import DLRMStructure
from .kept import Kept

__all__ = ["apply_kept_masks_", "extract", "extracted_structure", "masked_copy"]


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

    def out_dim(self, k: int) -> int:
        """Width of kept feature k's vector in the extracted model."""
        return self.stored[k] if self.folded[k] else len(self.dims[k])


def _sorted_indices(values, size: int, what: str) -> list[int]:
    out = sorted({int(v) for v in values})
    if out and (out[0] < 0 or out[-1] >= size):
        raise ValueError(f"{what}: indices must lie in [0, {size}), got {out[0]}..{out[-1]}")
    return out


def _resolve(model: DLRM, kept: Kept) -> _Plan:
    s = model.structure
    layers = model.linear_layers()
    logit = f"over.layers.{len(s.top) - 1}"

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
    return _Plan(use_dense=use_dense, features=features, dims=dims, neurons=neurons, rows=rows, pairs=pairs,
                 stored=stored, factorised=factorised, folded=folded)


def _resolve_ranks(s: DLRMStructure, kept: Kept, features: list[int], dims: list[list[int]]):
    """Stored width of each kept table and whether it is factorised (see the module docstring)."""
    names = s.feature_names
    unknown = sorted(set(kept.ranks) - set(names))
    if unknown:
        raise ValueError(f"Kept ranks name tables the model does not have: {unknown[:5]}")
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
    )
    if pairs is not None and pairs == structure.all_pairs():
        structure.pairs = None  # the reference order, stated as such
    return structure


def extracted_structure(model: DLRM, kept: Kept) -> DLRMStructure:
    """The structure `extract(model, kept)` builds, without touching any weight."""
    return _new_structure(model.structure, _resolve(model, kept))


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
def extract(model: DLRM, kept: Kept) -> DLRM:
    """The physically smaller DLRM: dropped tables and pairs gone, narrower tables, smaller Linears.

    Its outputs equal `masked_copy(model, kept)`'s. Under `dot`, a dim gate on `model` is folded in:
    |gate| into the kept table columns and the bottom MLP's last rows (ReLU commutes with a factor ≥ 0;
    every pair product sees gate² = |gate|²), and sign(gate) into the top MLP's bottom-output columns.
    `kept.ranks` factorise tables (module docstring), which masks cannot express: the outputs then equal
    those of the masked model of the same Kept without ranks when each rank reaches its kept columns' rank.
    The result has no gate, fresh parameters (nothing shared with `model`), the same sparse-gradient
    flag, device, dtype and train/eval mode.
    """
    s = model.structure
    plan = _resolve(model, kept)
    structure = _new_structure(s, plan)
    layers = model.linear_layers()
    gate = model.dim_gate.detach() if model.dim_gate is not None else None
    state: dict[str, Tensor] = {}

    names = s.feature_names
    folds: dict[int, Tensor] = {}  # kept feature k -> V_r (d' × r) to fold into over.layers.0 (`cat`)
    for k, (p, dims) in enumerate(zip(plan.features, plan.dims)):
        table, projection = _kept_factors(model, names[p], dims, gate)
        if plan.factorised[k]:
            table, projection = _truncated_svd(table, projection, plan.stored[k])
            if plan.folded[k]:
                folds[k], projection = projection, None
        state[f"sparse.tables.{names[p]}.weight"] = table
        if projection is not None:
            state[f"sparse.projections.{names[p]}.weight"] = projection

    previous = list(range(s.num_dense))
    for i in (range(len(s.bottom)) if plan.use_dense else ()):
        name = f"dense.layers.{i}"
        rows = plan.rows[name]
        weight = _index(_index(layers[name].weight.detach(), 0, rows), 1, previous)
        bias = _index(layers[name].bias.detach(), 0, rows)
        if i == len(s.bottom) - 1 and s.interaction == "dot":
            pruned = set(rows) - set(plan.neurons[name])
            scale = torch.tensor([0.0 if r in pruned else 1.0 for r in rows], dtype=weight.dtype,
                                 device=weight.device)
            if gate is not None:
                scale = scale * _index(gate, 0, rows).abs()
            weight, bias = weight * scale[:, None], bias * scale
        state[f"{name}.weight"], state[f"{name}.bias"] = weight, bias
        previous = rows

    previous = _top_input_columns(model, plan)
    for i in range(len(s.top)):
        name = f"over.layers.{i}"
        rows = plan.rows[name]
        weight = _index(_index(layers[name].weight.detach(), 0, rows), 1, previous)
        if i == 0 and gate is not None and plan.use_dense:
            width = len(plan.rows[f"dense.layers.{len(s.bottom) - 1}"])
            sign = torch.ones(weight.shape[1], dtype=weight.dtype, device=weight.device)
            sign[:width] = _index(gate, 0, plan.rows[f"dense.layers.{len(s.bottom) - 1}"]).sign()
            weight = weight * sign
        if i == 0 and folds:
            head = len(plan.rows[f"dense.layers.{len(s.bottom) - 1}"]) if plan.use_dense else 0
            weight = _fold_projections(weight, plan, folds, head)
        state[f"{name}.weight"] = weight
        state[f"{name}.bias"] = _index(layers[name].bias.detach(), 0, rows)
        previous = rows

    return _build(structure, state, model)


def _kept_factors(model: DLRM, name: str, dims: list[int], gate: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Table `name`'s kept columns as E = S Pᵀ: S (rows × w) stored, P (d' × w) its projection's kept
    output rows, or None when E = S. A `dot` gate scales the kept columns by |gate| (see `extract`)."""
    weight = model.sparse.tables[name].weight.detach()
    scale = None if gate is None else _index(gate, 0, dims).abs()
    if name not in model.sparse.projections:
        weight = _index(weight, 1, dims)
        return (weight if scale is None else weight * scale), None
    projection = _index(model.sparse.projections[name].weight.detach(), 0, dims)
    if scale is not None:
        projection = projection * scale[:, None]
    if projection.shape[0] <= projection.shape[1]:  # no wider than its input: multiply it into the table
        return weight @ projection.T, None
    return weight.clone(), projection  # clone: the extracted model owns fresh storage


GRAM_CHUNK = 1 << 16  # rows per float64 block of the Gram matrix: O(chunk·w) extra memory, whatever the rows


def _gram(weight: Tensor) -> Tensor:
    """SᵀS (w × w) in float64, accumulated over row blocks (no float64 copy of a 10 M-row table)."""
    gram = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64, device=weight.device)
    for block in weight.split(GRAM_CHUNK):
        block = block.double()
        gram += block.T @ block
    return gram


def _truncated_svd(table: Tensor, projection: Tensor | None, rank: int) -> tuple[Tensor, Tensor]:
    """Rank-`rank` truncated SVD of E = table · projectionᵀ (projection None: E = table), rows × d'.

    With EᵀE = V Λ Vᵀ (eigenvalues descending) and V_r its first r columns (the right singular vectors):
    E ≈ (E V_r) V_rᵀ. Returns (E V_r (rows × r), V_r (d' × r)); E V_r = S (Pᵀ V_r) is formed without E.
    """
    gram = _gram(table)
    if projection is not None:
        p = projection.double()
        gram = p @ gram @ p.T  # EᵀE = P (SᵀS) Pᵀ
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues
    v = vectors[:, -rank:].flip(1)
    # eigh's signs are arbitrary: make each vector's largest entry positive, so the result is reproducible.
    sign = v.gather(0, v.abs().argmax(0, keepdim=True)).sign()
    v = v * torch.where(sign == 0, torch.ones_like(sign), sign)
    mix = v if projection is None else projection.double().T @ v  # (w × r)
    return table @ mix.to(table.dtype), v.to(table.dtype)


def _fold_projections(weight: Tensor, plan: _Plan, folds: dict[int, Tensor], head: int) -> Tensor:
    """over.layers.0's weight (out × new input, kept columns selected) with each folded table's block of d'
    columns W_k replaced by its r columns W_k V_r (`cat`: the table now feeds its r-wide vector directly)."""
    blocks, start = [weight[:, :head]], head
    for k, dims in enumerate(plan.dims):
        block = weight[:, start : start + len(dims)]
        blocks.append(block @ folds[k] if k in folds else block)
        start += len(dims)
    return torch.cat(blocks, dim=1)


def _sparse_grad(model: DLRM) -> bool:
    tables = list(model.sparse.tables.values())
    return bool(tables[0].sparse) if tables else True


def _build(structure: DLRMStructure, state: dict[str, Tensor], like: DLRM) -> DLRM:
    """A fresh DLRM owning `state` (fresh tensors), placed and moded like `like`."""
    reference = next(like.parameters())
    out = DLRM(structure, sparse_grad=_sparse_grad(like))
    # Every tensor in `state` comes out of index_select or a product: fresh storage, safe to assign.
    out.load_state_dict({k: v.detach() for k, v in state.items()}, strict=True, assign=True)
    out.to(device=reference.device)
    out.train(like.training)
    return out


def apply_kept_masks_(model: DLRM, kept: Kept) -> DLRM:
    """Zero, in place, everything `kept` removes, keeping every shape (the reference for `extract`).

    Pruned hidden neurons: weight row and bias zeroed. Dropped feature: its top-input columns (`cat`), or
    the columns of every pair touching it (`dot`). Dropped dense block: the bottom-output columns, and under
    `dot` every pair touching T row 0. Pruned `cat` dim: its top-input column. Pruned `dot` dim: the dim
    gate's entry set to 0 (the gate is created if absent). Pruned pair: its top-input column.
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
        for name, rows in kept.neurons.items():
            layer = layers[name]
            keep = set(rows)
            removed = [r for r in range(layer.out_features) if r not in keep]
            layer.weight[removed] = 0.0
            layer.bias[removed] = 0.0
        if dead_columns:
            layers["over.layers.0"].weight[:, sorted(dead_columns)] = 0.0
    return model


def masked_copy(model: DLRM, kept: Kept) -> DLRM:
    """A deep copy of `model` with `apply_kept_masks_` applied: same shapes, removed parts contributing nothing."""
    return apply_kept_masks_(copy.deepcopy(model), kept)


def extracted_fractions(model: DLRM, kept: Kept) -> dict[str, float]:
    """FLOPs and params of the model `extract(model, kept)` would build, as fractions of `model`'s, measured
    on meta-device DLRMs of the structures (no weight is touched or allocated: sizing Kaggle tables is free)."""
    from ..models.cost import measure

    with torch.device("meta"):
        base = measure(DLRM(extracted_structure(model, Kept.everything(model)), sparse_grad=False))
        small = measure(DLRM(extracted_structure(model, kept), sparse_grad=False))
    return {"flops": small.flops / base.flops, "params": small.params / base.params}
