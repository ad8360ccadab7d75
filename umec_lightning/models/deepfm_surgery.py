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
signs). The result has no gate.

Factorisation (`kept.ranks`, `bases`, `factor_activation`: `deep_parts`' module docstring, DLRM's semantics): a
table's unit is its looked-up vector, the kept shared dims K and the first-order column (|K| + 1 wide, in that
order: a basis is (|K| + 1) × r); at rank r it becomes (E − μ) V and a projection r -> |K| + 1 (the FM needs every
embedding |K| wide). A deep layer becomes a `Factored`; the head and the first-order Linear never do.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .deep_parts import (
    FactorPlan,
    KeptPlan,
    cols_rows,
    factored_structure,
    index,
    kept_neuron_rows,
    kept_structure_fields,
    lookup_columns,
    rebuild,
    resolve_factoring,
    slice_deep,
    slice_tables,
    sorted_indices,
    table_positions,
)
from .deepfm import DeepFM, DeepFMStructure

__all__ = ["deepfm_extract", "deepfm_extracted_structure"]


def _resolve(model: DeepFM, kept, bases=None, factor_activation=None) -> tuple[KeptPlan, FactorPlan]:
    s: DeepFMStructure = model.structure
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
    plan = KeptPlan(use_dense=use_dense, features=features, dims=dims, positions=positions, neurons=neurons)
    columns = [lookup_columns(s, p, dims) for p in features]
    factors = resolve_factoring(model, kept, bases, factor_activation, features, columns,
                                dict(zip(s.hidden_names, neurons)))
    return plan, factors


def _new_structure(s: DeepFMStructure, plan: KeptPlan, factors: FactorPlan) -> DeepFMStructure:
    structure = DeepFMStructure(
        embedding_dim=len(plan.dims),
        **kept_structure_fields(s, plan),
    )
    return factored_structure(structure, s, factors)


def deepfm_extracted_structure(model: DeepFM, kept, bases=None, factor_activation=None) -> DeepFMStructure:
    """The structure `deepfm_extract(model, kept, bases, factor_activation)` builds, without touching any
    weight."""
    return _new_structure(model.structure, *_resolve(model, kept, bases, factor_activation))


@torch.no_grad()
def deepfm_extract(model: DeepFM, kept, bases=None, factor_activation=None) -> DeepFM:
    """The physically smaller DeepFM `kept` describes (module docstring). Its outputs equal the masked model's
    (removed features and dims zeroed in the gate or the tables, the dense input zeroed when its block is dropped,
    removed deep neurons zeroed); with `kept.ranks`, those of the model whose factorised units are their rank-r
    truncations (exact at full rank). Fresh parameters, the same sparse-gradient flag, device, dtype and train/eval
    mode; a model with meta tables gives meta tables of the new shapes (unless a table is factorised)."""
    s = model.structure
    plan, factors = _resolve(model, kept, bases, factor_activation)
    structure = _new_structure(s, plan, factors)
    ud, nf = int(s.use_dense), s.num_features
    gate = None if model.dim_gate is None else model.dim_gate.detach()
    state: dict[str, Tensor] = {}

    scales = None  # per kept table: the gate on its kept columns (the kept dims, then the first-order weight)
    if gate is not None:
        scales = [torch.cat([gate[ud + p] * index(gate[ud + nf:], 0, plan.dims), gate[ud + p].reshape(1)])
                  for p in plan.features]
    slice_tables(model, plan.features, factors, scales, structure, state)

    reader = model.x_reader()
    column_scale = None  # the dense block's gate on the x reader's dense columns
    head_bias = model.head.bias.detach().clone()
    if s.use_dense:
        dense_scale = gate[0] if gate is not None else None
        if plan.use_dense:
            first = model.first_order.weight.detach().clone()
            if dense_scale is not None:
                first = first * dense_scale
                column_scale = torch.ones(reader.in_features, dtype=first.dtype, device=first.device)
                column_scale[: s.num_dense] = dense_scale
            state["first_order.weight"] = first
            state["first_order.bias"] = model.first_order.bias.detach().clone()
        else:
            head_bias = head_bias + model.first_order.bias.detach()

    previous = slice_deep(model, plan.neurons, plan.positions, state, structure, factors, column_scale)
    head_weight = model.head.weight.detach()
    if model.deep is None and column_scale is not None:  # the head reads x
        head_weight = head_weight * column_scale
    state["head.weight"] = cols_rows(head_weight, None, previous)
    state["head.bias"] = head_bias
    return rebuild(DeepFM, structure, state, model)
