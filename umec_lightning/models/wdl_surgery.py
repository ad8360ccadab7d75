"""Wide & Deep's surgery by kept indices: from a `Kept` to the physically smaller model (as `dcnv2_surgery`: sorted
kept indices, `index_select`, a fresh module built from a smaller structure).

The x positions P that survive: the dense block's columns (iff `kept.use_dense` and the model reads it), then for
each kept feature, in the model's feature order, its kept embedding columns at its offset in x.

    tables:           the kept features' tables: their kept embedding columns, then their wide column (every row,
                      always: a kept table with no kept dim is its wide column alone); meta tables stay meta
    reader of x:      deep layer 0 (the head without a deep network): columns P
    deep layer i:     its kept rows; layer i > 0 the columns of layer i-1's kept rows; batch-norm channels follow
    head:             the last deep layer's kept rows (P without a deep network), its bias (+ the wide bias when
                      the dense block is dropped: the masked model still adds it)
    wide Linear:      as it is iff the dense block is kept, else gone

The compression gate (`WDL.dim_gate`: [g_dense (iff read), g_1 … g_F]) is folded: every kept column of table f
(embedding and wide) times g_f, the dense block's x-reader columns and the wide Linear's weight times g_dense (exact
for any signs; the wide bias is not scaled, as in the gated model). The result has no gate.

No factorisation exists for this family (`bases`, `kept.ranks` refused); `factor_activation` is accepted and ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .wdl import WDL, WDLStructure

__all__ = ["wdl_extract", "wdl_extracted_structure"]


@dataclass(frozen=True)
class _Plan:
    """A `Kept` resolved against one model: sorted, validated, in that model's numbering."""

    use_dense: bool
    features: list[int]  # kept positions in the model's tables (sorted)
    dims: list[list[int]]  # per kept feature: its kept embedding columns (sorted, possibly empty)
    positions: list[int]  # P: the kept x columns, in x order
    neurons: list[list[int]]  # per deep layer: its kept output rows (sorted, non-empty)


def _sorted_indices(values, size: int, what: str) -> list[int]:
    out = sorted({int(v) for v in values})
    if out and (out[0] < 0 or out[-1] >= size):
        raise ValueError(f"{what}: indices must lie in [0, {size}), got {out[0]}..{out[-1]}")
    return out


def _resolve(model: WDL, kept, bases=None) -> _Plan:
    s: WDLStructure = model.structure
    if bases:
        raise ValueError(f"bases given for {sorted(bases)[:5]}: Wide & Deep has no factorisation")
    if kept.ranks:
        raise ValueError(f"Kept ranks {dict(list(kept.ranks.items())[:3])} ask for a factorisation, which Wide & Deep "
                         "does not have")
    names = s.feature_names
    position = {fid: pos for pos, fid in enumerate(s.feature_ids)}
    unknown = [f for f in kept.feature_ids if f not in position]
    if unknown:
        raise ValueError(f"Kept feature ids {unknown[:5]} are not read by the model ({s.feature_ids})")
    unknown_dims = sorted(set(kept.dims) - set(names))
    if unknown_dims:
        raise ValueError(f"Kept dims name tables the model does not have: {unknown_dims[:5]} (tables {names[:4]}…)")
    hidden = s.hidden_names
    for name, rows in kept.neurons.items():
        if name in hidden:
            continue
        if name == s.logit_layer:
            raise ValueError(f"{name} is the logit layer; its single output cannot be pruned")
        if name == "wide" and model.wide is not None and sorted({int(r) for r in rows}) == [0]:
            continue  # the wide Linear whole: nothing to do (drop the dense block to remove it)
        raise ValueError(f"Kept names a layer whose neurons cannot be pruned: {name!r} (deep layers {hidden})")

    use_dense = bool(kept.use_dense) and s.use_dense
    offset = s.num_dense if s.use_dense else 0
    positions = list(range(s.num_dense)) if use_dense else []
    kept_positions = {position[f] for f in kept.feature_ids}
    features, dims = [], []
    for p, (name, width) in enumerate(zip(names, s.table_dims)):
        if p in kept_positions:
            d = _sorted_indices(kept.dims.get(name, range(width)), width, f"dims of table {name}")
            features.append(p)
            dims.append(d)
            positions += [offset + j for j in d]
        offset += width
    if not use_dense and not features:
        raise ValueError("Kept leaves no input (no dense block, no table): nothing to compute from")

    neurons = []
    for name, width in zip(hidden, s.deep):
        rows = _sorted_indices(kept.neurons.get(name, range(width)), width, f"neurons of {name}")
        if not rows:
            raise ValueError(f"{name} keeps no neuron: the deep network would be cut")
        neurons.append(rows)
    return _Plan(use_dense=use_dense, features=features, dims=dims, positions=positions, neurons=neurons)


def _new_structure(s: WDLStructure, plan: _Plan) -> WDLStructure:
    return WDLStructure(
        sparse_names=list(s.sparse_names),
        feature_ids=[s.feature_ids[p] for p in plan.features],
        table_sizes=[s.table_sizes[p] for p in plan.features],
        table_dims=[len(d) for d in plan.dims],
        num_dense=s.num_dense,
        deep=[len(rows) for rows in plan.neurons],
        use_dense=plan.use_dense,
        dense_names=None if s.dense_names is None else list(s.dense_names),
        batch_norm=None if s.batch_norm is None else list(s.batch_norm),
        dropout=None if s.dropout is None else dict(s.dropout),
    )


def wdl_extracted_structure(model: WDL, kept, bases=None, factor_activation=None) -> WDLStructure:
    """The structure `wdl_extract(model, kept)` builds, without touching any weight: the kept features in the
    model's order with their kept embedding column counts as table widths (each stored one wider: the wide column),
    the dense block iff kept (and read), the deep widths the kept neuron counts. ValueError for `bases` or
    `kept.ranks`, a feature, table or layer the model lacks, or a Kept that leaves no input."""
    del factor_activation  # no factored layer: nothing it could set
    return _new_structure(model.structure, _resolve(model, kept, bases))


def _index(t: Tensor, dim: int, keep: list[int]) -> Tensor:
    return t.index_select(dim, torch.tensor(keep, dtype=torch.long, device=t.device))


def _cols_rows(weight: Tensor, rows: list[int] | None, cols: list[int] | None) -> Tensor:
    w = weight.detach()
    if rows is not None:
        w = _index(w, 0, rows)
    if cols is not None:
        w = _index(w, 1, cols)
    return w if (rows is not None or cols is not None) else w.clone()


@torch.no_grad()
def wdl_extract(model: WDL, kept, bases=None, factor_activation=None) -> WDL:
    """The physically smaller Wide & Deep model `kept` describes (module docstring). Its outputs equal the masked
    model's (removed embedding columns, removed features (in the gate or their tables) and deep neurons zeroed, the
    dense input zeroed when its block is dropped), under any compression gate, which it folds (no gate). Fresh
    parameters, the same sparse-gradient flag, device, dtype and train/eval mode; a model whose tables are meta
    gives meta tables of the new shapes."""
    del factor_activation
    s = model.structure
    plan = _resolve(model, kept, bases)
    structure = _new_structure(s, plan)
    ud = int(s.use_dense)
    gate = None if model.dim_gate is None else model.dim_gate.detach()
    state: dict[str, Tensor] = {}

    for p, dims in zip(plan.features, plan.dims):
        name = s.feature_names[p]
        table = _index(model.sparse.tables[name].weight.detach(), 1, dims + [s.table_dims[p]])
        if gate is not None:
            table = table * gate[ud + p].to(table.device)
        state[f"sparse.tables.{name}.weight"] = table

    # The x reader (deep layer 0, else the head) with the dense block's gate folded into its dense columns.
    reader = model.deep.layers[0] if model.deep is not None else model.head
    reader_weight = reader.weight.detach()
    dense_scale = gate[0] if gate is not None and plan.use_dense else None
    if dense_scale is not None:
        reader_weight = reader_weight.clone()
        reader_weight[:, : s.num_dense] *= dense_scale

    previous = plan.positions
    if model.deep is not None:
        for i, (linear, norm) in enumerate(zip(model.deep.layers, model.deep.norms)):
            rows = plan.neurons[i]
            state[f"deep.layers.{i}.weight"] = _cols_rows(reader_weight if i == 0 else linear.weight, rows,
                                                          previous)
            state[f"deep.layers.{i}.bias"] = _index(linear.bias.detach(), 0, rows)
            if isinstance(norm, torch.nn.BatchNorm1d):
                for key, value in norm.state_dict().items():
                    state[f"deep.norms.{i}.{key}"] = value.detach().clone() if value.dim() == 0 \
                        else _index(value.detach(), 0, rows)
            previous = rows
    state["head.weight"] = _cols_rows(model.head.weight if model.deep is not None else reader_weight, None, previous)
    head_bias = model.head.bias.detach().clone()
    if model.wide is not None:
        if plan.use_dense:
            wide = model.wide.weight.detach().clone()
            state["wide.weight"] = wide if dense_scale is None else wide * dense_scale
            state["wide.bias"] = model.wide.bias.detach().clone()
        else:
            head_bias = head_bias + model.wide.bias.detach()
    state["head.bias"] = head_bias
    return _build(structure, state, model)


def _build(structure: WDLStructure, state: dict[str, Tensor], like: WDL) -> WDL:
    """A fresh model owning `state`, placed and moded like `like` (built with meta tables, then every parameter
    and buffer assigned: real tables where `like` holds its tables, meta ones of the new shapes where not)."""
    device = next(p.device for name, p in like.named_parameters() if not name.startswith("sparse."))
    with torch.device(device):
        out = WDL(structure, sparse_grad=like.sparse_grad, hold_tables=False)
    out.load_state_dict(state, strict=True, assign=True)
    out.train(like.training)
    return out
