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

import torch
from torch import Tensor

from .deep_parts import (
    KeptPlan,
    cols_rows,
    index,
    kept_neuron_rows,
    kept_structure_fields,
    rebuild,
    refuse_factoring,
    slice_deep,
    sorted_indices,
    table_positions,
)
from .deepfm import DeepFM, DeepFMStructure

__all__ = ["deepfm_extract", "deepfm_extracted_structure"]


def _resolve(model: DeepFM, kept, bases=None) -> KeptPlan:
    s: DeepFMStructure = model.structure
    refuse_factoring(kept, bases, "DeepFM")
    names = s.feature_names
    position = table_positions(s, kept)
    hidden = s.hidden_names
    for name in kept.neurons:
        if name not in hidden:
            raise ValueError(f"Kept names {name!r}, which is not a deep layer ({hidden}): only deep neurons prune")

    features = sorted(position[f] for f in set(kept.feature_ids))
    lists = {tuple(sorted_indices(kept.dims[names[p]], s.embedding_dim, f"dims of table {names[p]}"))
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
    neurons = kept_neuron_rows(s, kept)
    return KeptPlan(use_dense=use_dense, features=features, dims=dims, positions=positions, neurons=neurons)


def _new_structure(s: DeepFMStructure, plan: KeptPlan) -> DeepFMStructure:
    return DeepFMStructure(
        embedding_dim=len(plan.dims),
        **kept_structure_fields(s, plan),
    )


def deepfm_extracted_structure(model: DeepFM, kept, bases=None, factor_activation=None) -> DeepFMStructure:
    """The structure `deepfm_extract(model, kept)` builds, without touching any weight."""
    del factor_activation
    return _new_structure(model.structure, _resolve(model, kept, bases))


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
        table = index(model.sparse.tables[name].weight.detach(), 1, columns)
        if gate is not None:
            g = gate[ud + p]
            scale = torch.cat([g * index(gate[ud + nf:], 0, plan.dims), g.reshape(1)])
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

    previous = slice_deep(model, plan.neurons, plan.positions, state, reader_weight)
    state["head.weight"] = cols_rows(model.head.weight if model.deep is not None else reader_weight, None, previous)
    state["head.bias"] = head_bias
    return rebuild(DeepFM, structure, state, model)
