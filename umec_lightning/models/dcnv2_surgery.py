"""DCNv2's surgery by kept indices: from a `Kept` to the physically smaller DCNv2 (as `compression.extract`'s
`dlrm_extract` for DLRM: sorted kept indices, `index_select`, a fresh module built from a smaller structure).

The x0 positions P that survive: the dense block's columns (iff `kept.use_dense` and the model reads it), then
for each kept feature, in the model's feature order, its kept table columns at its offset in x0. A removed x0
coordinate is zero in the masked model, and a zero coordinate of x0 stays zero through every cross layer
(x_{l+1,j} = x0_j·(…) + x_{l,j} = 0): dropping it drops the matching rows and columns of the cross maps.

    cross, full rank:   W[P][:, P], b[P]
    cross, mixture:     V_k[:, P], U_k[P], g_k[:, P], bias[P]; C_k as it is (the rank does not change)
    tables:             the kept features' tables, their kept columns (every row); meta tables stay meta
    deep layer 0:       columns P (x0 in parallel, the cross output in stacked: both W wide), its kept rows
    deep layer i > 0:   columns = layer i-1's kept rows, its kept rows; batch-norm channels follow the rows
    head, parallel:     columns P (the cross output, first), then W + the last deep layer's kept rows
    head, stacked:      the last deep layer's kept rows (P without a deep network)

`Kept.neurons` names deep layers (`deep.layers.<i>`); a cross Linear may be named only with all its rows (as
`Kept.everything` lists it): its outputs follow x0, pruned through the dense block, the features and the dims.
No factorisation exists for this family yet (`bases`, `kept.ranks` refused); `factor_activation` only concerns
factored layers, of which a DCNv2 has none, and is accepted and ignored. A DCNv2 has no dim gate to fold.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .dcnv2 import DCNv2, DCNv2Structure, MixtureCrossLayer

__all__ = ["dcnv2_extract", "dcnv2_extracted_structure"]


@dataclass(frozen=True)
class _Plan:
    """A `Kept` resolved against one DCNv2: sorted, validated, in that model's numbering."""

    use_dense: bool
    features: list[int]  # kept positions in the model's tables (sorted, each keeping >= 1 column)
    dims: list[list[int]]  # per kept feature: its kept table columns (sorted, non-empty)
    positions: list[int]  # P: the kept x0 columns, in x0 order
    neurons: list[list[int]]  # per deep layer: its kept output rows (sorted, non-empty)


def _sorted_indices(values, size: int, what: str) -> list[int]:
    out = sorted({int(v) for v in values})
    if out and (out[0] < 0 or out[-1] >= size):
        raise ValueError(f"{what}: indices must lie in [0, {size}), got {out[0]}..{out[-1]}")
    return out


def _resolve(model: DCNv2, kept, bases=None) -> _Plan:
    s: DCNv2Structure = model.structure
    if bases:
        raise ValueError(f"bases given for {sorted(bases)[:5]}: DCNv2 has no factorisation yet")
    if kept.ranks:
        raise ValueError(f"Kept ranks {dict(list(kept.ranks.items())[:3])} ask for a factorisation, which DCNv2 "
                         "does not have yet")
    if getattr(model, "dim_gate", None) is not None:
        raise ValueError("this DCNv2 has a dim gate, which its surgery cannot fold")

    names = s.feature_names
    position = {fid: pos for pos, fid in enumerate(s.feature_ids)}
    unknown = [f for f in kept.feature_ids if f not in position]
    if unknown:
        raise ValueError(f"Kept feature ids {unknown[:5]} are not read by the model ({s.feature_ids})")
    unknown_dims = sorted(set(kept.dims) - set(names))
    if unknown_dims:
        raise ValueError(f"Kept dims name tables the model does not have: {unknown_dims[:5]} (tables {names[:4]}…)")

    layers = model.linear_layers()
    hidden = s.hidden_names
    for name, rows in kept.neurons.items():
        if name in hidden:
            continue
        if name == s.logit_layer:
            raise ValueError(f"{name} is the logit layer; its single output cannot be pruned")
        if name not in layers:
            raise ValueError(f"Kept names Linear layers the model does not have: {name!r} (deep layers {hidden})")
        if sorted({int(r) for r in rows}) != list(range(layers[name].out_features)):
            raise ValueError(f"Kept prunes {name}'s outputs: a cross layer's follow x0 (prune the dense block, "
                             "features or dims instead)")

    use_dense = bool(kept.use_dense) and s.use_dense
    offset = s.num_dense if s.use_dense else 0
    positions = list(range(s.num_dense)) if use_dense else []
    kept_positions = {position[f] for f in kept.feature_ids}
    features, dims = [], []
    for p, (name, width) in enumerate(zip(names, s.table_dims)):
        if p in kept_positions:
            d = _sorted_indices(kept.dims.get(name, range(width)), width, f"dims of table {name}")
            if d:  # a table with no kept column contributes nothing: dropped with its feature
                features.append(p)
                dims.append(d)
                positions += [offset + j for j in d]
        offset += width
    if not positions:
        raise ValueError("Kept leaves nothing of x0 (no dense block, no table column): nothing to compute from")

    neurons = []
    for name, width in zip(hidden, s.deep):
        rows = _sorted_indices(kept.neurons.get(name, range(width)), width, f"neurons of {name}")
        if not rows:
            raise ValueError(f"{name} keeps no neuron: the deep network would be cut")
        neurons.append(rows)
    return _Plan(use_dense=use_dense, features=features, dims=dims, positions=positions, neurons=neurons)


def _new_structure(s: DCNv2Structure, plan: _Plan) -> DCNv2Structure:
    return DCNv2Structure(
        sparse_names=list(s.sparse_names),
        feature_ids=[s.feature_ids[p] for p in plan.features],
        table_sizes=[s.table_sizes[p] for p in plan.features],
        table_dims=[len(d) for d in plan.dims],
        num_dense=s.num_dense,
        deep=[len(rows) for rows in plan.neurons],
        cross_layers=s.cross_layers,
        cross_rank=s.cross_rank,
        experts=s.experts,
        stacking=s.stacking,
        use_dense=plan.use_dense,
        dense_names=None if s.dense_names is None else list(s.dense_names),
        batch_norm=None if s.batch_norm is None else list(s.batch_norm),
        dropout=None if s.dropout is None else dict(s.dropout),
    )


def dcnv2_extracted_structure(model: DCNv2, kept, bases=None, factor_activation=None) -> DCNv2Structure:
    """The structure `dcnv2_extract(model, kept)` builds, without touching any weight: the kept features in the
    model's order with their kept column counts as table widths, the dense block iff kept (and read), the deep
    widths the kept neuron counts, everything else as the model's. ValueError for `bases` or `kept.ranks` (no
    factorisation yet), a feature, table or layer the model lacks, or a Kept that leaves nothing of x0."""
    del factor_activation  # no factored layer in a DCNv2: nothing it could set
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
def dcnv2_extract(model: DCNv2, kept, bases=None, factor_activation=None) -> DCNv2:
    """The physically smaller DCNv2 `kept` describes (module docstring for the surgery). Its outputs equal the
    masked model's (the removed table columns and deep neurons zeroed, the dense input zeroed when its block is
    dropped). The result has fresh parameters (nothing shared with `model`), the same sparse-gradient flag,
    device, dtype and train/eval mode; a model whose tables are meta (`holds_tables` False) gives meta tables
    of the new shapes."""
    del factor_activation  # see `dcnv2_extracted_structure`
    s = model.structure
    plan = _resolve(model, kept, bases)
    structure = _new_structure(s, plan)
    P = plan.positions
    state: dict[str, Tensor] = {}

    for p, dims in zip(plan.features, plan.dims):
        name = s.feature_names[p]
        state[f"sparse.tables.{name}.weight"] = _index(model.sparse.tables[name].weight.detach(), 1, dims)

    for i, layer in enumerate(model.cross.layers):
        prefix = f"cross.layers.{i}"
        if isinstance(layer, MixtureCrossLayer):
            for k in range(len(layer.v)):
                state[f"{prefix}.v.{k}.weight"] = _cols_rows(layer.v[k].weight, None, P)
                state[f"{prefix}.c.{k}.weight"] = _cols_rows(layer.c[k].weight, None, None)
                state[f"{prefix}.u.{k}.weight"] = _cols_rows(layer.u[k].weight, P, None)
                state[f"{prefix}.gates.{k}.weight"] = _cols_rows(layer.gates[k].weight, None, P)
            state[f"{prefix}.bias"] = _index(layer.bias.detach(), 0, P)
        else:
            state[f"{prefix}.linear.weight"] = _cols_rows(layer.linear.weight, P, P)
            state[f"{prefix}.linear.bias"] = _index(layer.linear.bias.detach(), 0, P)

    previous = P
    if model.deep is not None:
        for i, (linear, norm) in enumerate(zip(model.deep.layers, model.deep.norms)):
            rows = plan.neurons[i]
            state[f"deep.layers.{i}.weight"] = _cols_rows(linear.weight, rows, previous)
            state[f"deep.layers.{i}.bias"] = _index(linear.bias.detach(), 0, rows)
            if isinstance(norm, torch.nn.BatchNorm1d):
                for key, value in norm.state_dict().items():
                    state[f"deep.norms.{i}.{key}"] = value.detach().clone() if value.dim() == 0 \
                        else _index(value.detach(), 0, rows)
            previous = rows

    if model.parallel:
        deep_columns = [s.width + j for j in plan.neurons[-1]] if model.deep is not None else []
        head_columns = P + deep_columns
    else:
        head_columns = previous  # the last deep layer's kept rows, or P without a deep network
    state["head.weight"] = _cols_rows(model.head.weight, None, head_columns)
    state["head.bias"] = model.head.bias.detach().clone()
    return _build(structure, state, model)


def _build(structure: DCNv2Structure, state: dict[str, Tensor], like: DCNv2) -> DCNv2:
    """A fresh DCNv2 owning `state` (fresh tensors: index_select or clone), placed and moded like `like`.

    Built on `like`'s device with meta tables (nothing allocated for them), then every parameter and buffer
    assigned from `state`: real tables where `like` holds its tables, meta ones of the new shapes where not."""
    device = next(p.device for name, p in like.named_parameters() if not name.startswith("sparse."))
    with torch.device(device):
        out = DCNv2(structure, sparse_grad=like.sparse_grad, hold_tables=False)
    out.load_state_dict(state, strict=True, assign=True)
    out.train(like.training)
    return out
