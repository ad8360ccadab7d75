"""DeepFM's surgery by kept indices: from a `Kept` to the physically smaller DeepFM (as `dcnv2_surgery`: sorted kept
indices, `index_select`, a fresh module built from a smaller structure).

    tables:            the kept features' tables, the kept shared dims K (one list for every table, as DLRM's
                       `dot`) and the first-order column; meta tables stay meta
    first order:       the dense Linear iff the dense block is kept; a dropped block's first-order bias moves into
                       the head's bias (the masked model still adds it)
    x reader:          columns P = the dense block's (iff kept), then off_f + k for every kept feature f, k in K
    deep layer i > 0:  columns = layer i-1's kept rows, its kept rows; batch-norm channels follow the rows
    head:              the last deep layer's kept rows (P without a deep network)

The compression gate (`DeepFM.dim_gate`: [g_dense, g_f …, γ_k …]) is folded: table f's column k times g_f·γ_k, its
first-order column times g_f, the dense block's x-reader and first-order columns times g_dense (exact for any
signs). The result has no gate. `bases`, `kept.ranks` are refused (no factorisation); `factor_activation` is
accepted and ignored (no factored layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .deepfm import DeepFM, DeepFMStructure

__all__ = ["deepfm_extract", "deepfm_extracted_structure"]


@dataclass(frozen=True)
class _Plan:
    use_dense: bool
    features: list[int]  # kept positions in the model's tables (sorted)
    dims: list[int]  # the kept shared dims (sorted, non-empty)
    positions: list[int]  # P: the kept x columns, in x order
    neurons: list[list[int]]  # per deep layer: its kept output rows (sorted, non-empty)


def _sorted_indices(values, size: int, what: str) -> list[int]:
    out = sorted({int(v) for v in values})
    if out and (out[0] < 0 or out[-1] >= size):
        raise ValueError(f"{what}: indices must lie in [0, {size}), got {out[0]}..{out[-1]}")
    return out


def _resolve(model: DeepFM, kept, bases=None) -> _Plan:
    s: DeepFMStructure = model.structure
    if bases:
        raise ValueError(f"bases given for {sorted(bases)[:5]}: DeepFM has no factorisation")
    if kept.ranks:
        raise ValueError(f"Kept ranks {dict(list(kept.ranks.items())[:3])} ask for a factorisation, which DeepFM "
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
    for name in kept.neurons:
        if name not in hidden:
            raise ValueError(f"Kept names {name!r}, which is not a deep layer ({hidden}): only deep neurons prune")

    features = sorted(position[f] for f in set(kept.feature_ids))
    lists = {tuple(_sorted_indices(kept.dims[names[p]], s.embedding_dim, f"dims of table {names[p]}"))
             for p in features if names[p] in kept.dims}
    if len(lists) > 1:
        raise ValueError(f"a DeepFM's FM needs one shared list of kept dims for every table, got {len(lists)} lists")
    dims = list(lists.pop()) if lists else list(range(s.embedding_dim))
    if not dims:
        raise ValueError("Kept keeps no shared embedding dim")
    use_dense = bool(kept.use_dense) and s.use_dense
    if not use_dense and not features:
        raise ValueError("Kept leaves no input (no dense block, no table): nothing to compute from")
    positions = list(range(s.num_dense)) if use_dense else []
    head = s.num_dense if s.use_dense else 0
    for p in features:
        positions += [head + p * s.embedding_dim + k for k in dims]
    neurons = []
    for name, width in zip(hidden, s.deep):
        rows = _sorted_indices(kept.neurons.get(name, range(width)), width, f"neurons of {name}")
        if not rows:
            raise ValueError(f"{name} keeps no neuron: the deep network would be cut")
        neurons.append(rows)
    return _Plan(use_dense=use_dense, features=features, dims=dims, positions=positions, neurons=neurons)


def _new_structure(s: DeepFMStructure, plan: _Plan) -> DeepFMStructure:
    return DeepFMStructure(
        sparse_names=list(s.sparse_names),
        feature_ids=[s.feature_ids[p] for p in plan.features],
        table_sizes=[s.table_sizes[p] for p in plan.features],
        embedding_dim=len(plan.dims),
        num_dense=s.num_dense,
        deep=[len(rows) for rows in plan.neurons],
        use_dense=plan.use_dense,
        dense_names=None if s.dense_names is None else list(s.dense_names),
        batch_norm=None if s.batch_norm is None else list(s.batch_norm),
        dropout=None if s.dropout is None else dict(s.dropout),
    )


def deepfm_extracted_structure(model: DeepFM, kept, bases=None, factor_activation=None) -> DeepFMStructure:
    """The structure `deepfm_extract(model, kept)` builds, without touching any weight."""
    del factor_activation
    return _new_structure(model.structure, _resolve(model, kept, bases))


def _index(t: Tensor, dim: int, keep: list[int]) -> Tensor:
    return t.index_select(dim, torch.tensor(keep, dtype=torch.long, device=t.device))


@torch.no_grad()
def deepfm_extract(model: DeepFM, kept, bases=None, factor_activation=None) -> DeepFM:
    """The physically smaller DeepFM `kept` describes (module docstring). Its outputs equal the masked model's
    (removed features and dims zeroed in the gate or the tables, the dense input zeroed when its block is dropped,
    removed deep neurons zeroed). Fresh parameters, the same sparse-gradient flag, device, dtype and train/eval
    mode; a model with meta tables gives meta tables of the new shapes."""
    del factor_activation
    s = model.structure
    plan = _resolve(model, kept, bases)
    structure = _new_structure(s, plan)
    ud, nf, dim = int(s.use_dense), s.num_features, s.embedding_dim
    gate = None if model.dim_gate is None else model.dim_gate.detach()
    state: dict[str, Tensor] = {}

    columns = plan.dims + [dim]  # the kept embedding columns, then the first-order weight
    for p in plan.features:
        name = s.feature_names[p]
        table = _index(model.sparse.tables[name].weight.detach(), 1, columns)
        if gate is not None:
            g = gate[ud + p]
            scale = torch.cat([g * _index(gate[ud + nf:], 0, plan.dims), g.reshape(1)])
            table = table * scale.to(table.device)
        state[f"sparse.tables.{name}.weight"] = table

    reader = model.x_reader()
    reader_weight = reader.weight.detach().clone()
    head_bias = model.head.bias.detach().clone()
    if s.use_dense:
        dense_scale = gate[0] if gate is not None else None
        if plan.use_dense:
            first = model.first_order.weight.detach().clone()
            if dense_scale is not None:
                first = first * dense_scale
                reader_weight[:, : s.num_dense] *= dense_scale
            state["first_order.weight"] = first
            state["first_order.bias"] = model.first_order.bias.detach().clone()
        else:
            head_bias = head_bias + model.first_order.bias.detach()

    previous = plan.positions
    if model.deep is not None:
        for i, (linear, norm) in enumerate(zip(model.deep.layers, model.deep.norms)):
            rows = plan.neurons[i]
            weight = reader_weight if i == 0 else linear.weight.detach()
            state[f"deep.layers.{i}.weight"] = _index(_index(weight, 0, rows), 1, previous)
            state[f"deep.layers.{i}.bias"] = _index(linear.bias.detach(), 0, rows)
            if isinstance(norm, torch.nn.BatchNorm1d):
                for key, value in norm.state_dict().items():
                    state[f"deep.norms.{i}.{key}"] = value.detach().clone() if value.dim() == 0 \
                        else _index(value.detach(), 0, rows)
            previous = rows
        state["head.weight"] = _index(model.head.weight.detach(), 1, previous)
    else:
        state["head.weight"] = _index(reader_weight, 1, previous)
    state["head.bias"] = head_bias
    return _build(structure, state, model)


def _build(structure: DeepFMStructure, state: dict[str, Tensor], like: DeepFM) -> DeepFM:
    """A fresh DeepFM owning `state`, built on `like`'s device with meta tables, then every tensor assigned."""
    device = next(p.device for name, p in like.named_parameters() if not name.startswith("sparse."))
    with torch.device(device):
        out = DeepFM(structure, sparse_grad=like.sparse_grad, hold_tables=False)
    out.load_state_dict(state, strict=True, assign=True)
    out.train(like.training)
    return out
