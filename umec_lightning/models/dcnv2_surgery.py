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
A DCNv2 has no dim gate to fold.

Factorisation (`kept.ranks`, `bases`, `factor_activation`: `deep_parts`' module docstring, DLRM's semantics): a table
E (rows × kept dims) at rank r becomes (E − μ) V and a projection r -> kept dims (x0 reads the projected vector: the
cross layers multiply by x0 element-wise, so nothing folds it away); a deep layer or a full-rank cross matrix
`cross.layers.<i>.linear` (rows and columns P, its basis over the kept x0 positions) becomes a `Factored`. A
factorised model's projections and factored layers are carried through a later surgery (pruned as above: a
projection's kept output rows, a factored layer's second-factor rows and first-factor columns).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .dcnv2 import DCNv2, DCNv2Structure, MixtureCrossLayer
from .deep_parts import (
    FactorPlan,
    KeptPlan,
    cols_rows,
    factored_structure,
    index,
    kept_neuron_rows,
    kept_structure_fields,
    kept_table_columns,
    layer_chain,
    lookup_columns,
    rebuild,
    resolve_factoring,
    slice_deep,
    slice_tables,
    store_layer,
    table_positions,
)

__all__ = ["dcnv2_extract", "dcnv2_extracted_structure"]


def _resolve(model: DCNv2, kept, bases=None, factor_activation=None) -> tuple[KeptPlan, FactorPlan]:
    s: DCNv2Structure = model.structure
    if getattr(model, "dim_gate", None) is not None:
        raise ValueError("this DCNv2 has a dim gate, which its surgery cannot fold")

    position = table_positions(s, kept)

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

    # A table with no kept column contributes nothing: dropped with its feature.
    use_dense, features, dims, positions = kept_table_columns(s, kept, position, drop_empty=True)
    if not positions:
        raise ValueError("Kept leaves nothing of x0 (no dense block, no table column): nothing to compute from")

    neurons = kept_neuron_rows(s, kept)
    plan = KeptPlan(use_dense=use_dense, features=features, dims=dims, positions=positions, neurons=neurons)
    rows = dict(zip(s.hidden_names, neurons)) | {name: positions for name in s.extra_linear_shapes()}
    columns = [lookup_columns(s, p, d) for p, d in zip(features, dims)]
    return plan, resolve_factoring(model, kept, bases, factor_activation, features, columns, rows)


def _new_structure(s: DCNv2Structure, plan: KeptPlan, factors: FactorPlan) -> DCNv2Structure:
    return factored_structure(_kept_structure(s, plan), s, factors)


def _kept_structure(s: DCNv2Structure, plan: KeptPlan) -> DCNv2Structure:
    return DCNv2Structure(
        table_dims=[len(d) for d in plan.dims],
        cross_layers=s.cross_layers,
        cross_rank=s.cross_rank,
        experts=s.experts,
        stacking=s.stacking,
        dense_norm=s.dense_norm,
        **kept_structure_fields(s, plan),
    )


def dcnv2_extracted_structure(model: DCNv2, kept, bases=None, factor_activation=None) -> DCNv2Structure:
    """The structure `dcnv2_extract(model, kept, bases, factor_activation)` builds, without touching any weight:
    the kept features in the model's order with their kept column counts as table widths (stored at their ranks),
    the dense block iff kept (and read), the deep widths the kept neuron counts, the factored layers, everything
    else as the model's. ValueError for a feature, table or layer the model lacks, a rank or basis it cannot take,
    or a Kept that leaves nothing of x0."""
    return _new_structure(model.structure, *_resolve(model, kept, bases, factor_activation))


@torch.no_grad()
def dcnv2_extract(model: DCNv2, kept, bases=None, factor_activation=None) -> DCNv2:
    """The physically smaller DCNv2 `kept` describes (module docstring for the surgery). Its outputs equal the
    masked model's (the removed table columns and deep neurons zeroed, the dense input zeroed when its block is
    dropped); with `kept.ranks`, those of the model whose factorised units are their rank-r truncations (exact at
    full rank). The result has fresh parameters (nothing shared with `model`), the same sparse-gradient flag,
    device, dtype and train/eval mode; a model whose tables are meta (`holds_tables` False) gives meta tables
    of the new shapes (unless a table is factorised: that reads it)."""
    s = model.structure
    plan, factors = _resolve(model, kept, bases, factor_activation)
    structure = _new_structure(s, plan, factors)
    P = plan.positions
    state: dict[str, Tensor] = {}

    slice_tables(model, plan.features, factors, None, structure, state)

    if plan.use_dense and isinstance(model.dense, nn.BatchNorm1d):  # the block is kept whole or not at all
        state.update({f"dense.{k}": v.detach().clone() for k, v in model.dense.state_dict().items()})

    for i, layer in enumerate(model.cross.layers):
        prefix = f"cross.layers.{i}"
        if isinstance(layer, MixtureCrossLayer):
            for k in range(len(layer.v)):
                state[f"{prefix}.v.{k}.weight"] = cols_rows(layer.v[k].weight, None, P)
                state[f"{prefix}.c.{k}.weight"] = cols_rows(layer.c[k].weight, None, None)
                state[f"{prefix}.u.{k}.weight"] = cols_rows(layer.u[k].weight, P, None)
                state[f"{prefix}.gates.{k}.weight"] = cols_rows(layer.gates[k].weight, None, P)
            state[f"{prefix}.bias"] = index(layer.bias.detach(), 0, P)
        else:
            store_layer(state, f"{prefix}.linear", layer_chain(model, f"{prefix}.linear", P, P, structure, factors))

    previous = slice_deep(model, plan.neurons, P, state, structure, factors)

    if model.parallel:
        deep_columns = [s.width + j for j in plan.neurons[-1]] if model.deep is not None else []
        head_columns = P + deep_columns
    else:
        head_columns = previous  # the last deep layer's kept rows, or P without a deep network
    state["head.weight"] = cols_rows(model.head.weight, None, head_columns)
    state["head.bias"] = model.head.bias.detach().clone()
    return rebuild(DCNv2, structure, state, model)
