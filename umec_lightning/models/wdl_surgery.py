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

Factorisation (`kept.ranks`, `bases`, `factor_activation`: `deep_parts`' module docstring, DLRM's semantics): a
table's unit is its looked-up vector, its kept embedding columns then its wide column (|K_f| + 1 wide, in that order:
a basis is (|K_f| + 1) × r); at rank r it becomes (E − μ) V and a projection r -> |K_f| + 1. A deep layer becomes a
`Factored`; the head and the wide Linear never do.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .deep_parts import (
    FactorPlan,
    KeptPlan,
    cols_rows,
    factored_structure,
    kept_neuron_rows,
    kept_structure_fields,
    kept_table_columns,
    lookup_columns,
    rebuild,
    resolve_factoring,
    slice_deep,
    slice_tables,
    table_positions,
)
from .wdl import WDL, WDLStructure

__all__ = ["wdl_extract", "wdl_extracted_structure"]


def _resolve(model: WDL, kept, bases=None, factor_activation=None) -> tuple[KeptPlan, FactorPlan]:
    s: WDLStructure = model.structure
    position = table_positions(s, kept)
    hidden = s.hidden_names
    for name, rows in kept.neurons.items():
        if name in hidden:
            continue
        if name == s.logit_layer:
            raise ValueError(f"{name} is the logit layer; its single output cannot be pruned")
        if name == "wide" and model.wide is not None and sorted({int(r) for r in rows}) == [0]:
            continue  # the wide Linear whole: nothing to do (drop the dense block to remove it)
        raise ValueError(f"Kept names a layer whose neurons cannot be pruned: {name!r} (deep layers {hidden})")

    # A kept table with no kept column stays (its wide column).
    use_dense, features, dims, positions = kept_table_columns(s, kept, position, drop_empty=False)
    if not use_dense and not features:
        raise ValueError("Kept leaves no input (no dense block, no table): nothing to compute from")

    neurons = kept_neuron_rows(s, kept)
    plan = KeptPlan(use_dense=use_dense, features=features, dims=dims, positions=positions, neurons=neurons)
    columns = [lookup_columns(s, p, d) for p, d in zip(features, dims)]
    factors = resolve_factoring(model, kept, bases, factor_activation, features, columns,
                                dict(zip(s.hidden_names, neurons)))
    return plan, factors


def _new_structure(s: WDLStructure, plan: KeptPlan, factors: FactorPlan) -> WDLStructure:
    structure = WDLStructure(
        table_dims=[len(d) for d in plan.dims],
        **kept_structure_fields(s, plan),
    )
    return factored_structure(structure, s, factors)


def wdl_extracted_structure(model: WDL, kept, bases=None, factor_activation=None) -> WDLStructure:
    """The structure `wdl_extract(model, kept, bases, factor_activation)` builds, without touching any weight: the
    kept features in the model's order with their kept embedding column counts as table widths (each looked up one
    wider: the wide column; stored at its rank where factorised), the dense block iff kept (and read), the deep
    widths the kept neuron counts, the factored layers. ValueError for a feature, table or layer the model lacks, a
    rank or basis it cannot take, or a Kept that leaves no input."""
    return _new_structure(model.structure, *_resolve(model, kept, bases, factor_activation))


@torch.no_grad()
def wdl_extract(model: WDL, kept, bases=None, factor_activation=None) -> WDL:
    """The physically smaller Wide & Deep model `kept` describes (module docstring). Its outputs equal the masked
    model's (removed embedding columns, removed features (in the gate or their tables) and deep neurons zeroed, the
    dense input zeroed when its block is dropped), under any compression gate, which it folds (no gate); with
    `kept.ranks`, those of the model whose factorised units are their rank-r truncations (exact at full rank). Fresh
    parameters, the same sparse-gradient flag, device, dtype and train/eval mode; a model whose tables are meta
    gives meta tables of the new shapes (unless a table is factorised)."""
    s = model.structure
    plan, factors = _resolve(model, kept, bases, factor_activation)
    structure = _new_structure(s, plan, factors)
    ud = int(s.use_dense)
    gate = None if model.dim_gate is None else model.dim_gate.detach()
    state: dict[str, Tensor] = {}

    scales = None if gate is None else [gate[ud + p].expand(len(c)) for p, c in zip(plan.features, factors.columns)]
    slice_tables(model, plan.features, factors, scales, structure, state)

    # The x reader (deep layer 0, else the head) with the dense block's gate folded into its dense columns.
    reader_in = s.width
    dense_scale = gate[0] if gate is not None and plan.use_dense else None
    column_scale = None
    if dense_scale is not None:
        column_scale = torch.ones(reader_in, dtype=dense_scale.dtype, device=dense_scale.device)
        column_scale[: s.num_dense] = dense_scale

    previous = slice_deep(model, plan.neurons, plan.positions, state, structure, factors, column_scale)
    head_weight = model.head.weight.detach()
    if model.deep is None and column_scale is not None:  # the head reads x
        head_weight = head_weight * column_scale
    state["head.weight"] = cols_rows(head_weight, None, previous)
    head_bias = model.head.bias.detach().clone()
    if model.wide is not None:
        if plan.use_dense:
            wide = model.wide.weight.detach().clone()
            state["wide.weight"] = wide if dense_scale is None else wide * dense_scale
            state["wide.bias"] = model.wide.bias.detach().clone()
        else:
            head_bias = head_bias + model.wide.bias.detach()
    state["head.bias"] = head_bias
    return rebuild(WDL, structure, state, model)
