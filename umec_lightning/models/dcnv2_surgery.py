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

import torch
from torch import Tensor, nn

from .dcnv2 import DCNv2, DCNv2Structure, MixtureCrossLayer
from .deep_parts import (
    KeptPlan,
    cols_rows,
    index,
    kept_neuron_rows,
    kept_structure_fields,
    kept_table_columns,
    rebuild,
    refuse_factoring,
    slice_deep,
    table_positions,
)

__all__ = ["dcnv2_extract", "dcnv2_extracted_structure"]


def _resolve(model: DCNv2, kept, bases=None) -> KeptPlan:
    s: DCNv2Structure = model.structure
    refuse_factoring(kept, bases, "DCNv2", " yet")
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
    return KeptPlan(use_dense=use_dense, features=features, dims=dims, positions=positions, neurons=neurons)


def _new_structure(s: DCNv2Structure, plan: KeptPlan) -> DCNv2Structure:
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
    """The structure `dcnv2_extract(model, kept)` builds, without touching any weight: the kept features in the
    model's order with their kept column counts as table widths, the dense block iff kept (and read), the deep
    widths the kept neuron counts, everything else as the model's. ValueError for `bases` or `kept.ranks` (no
    factorisation yet), a feature, table or layer the model lacks, or a Kept that leaves nothing of x0."""
    del factor_activation  # no factored layer in a DCNv2: nothing it could set
    return _new_structure(model.structure, _resolve(model, kept, bases))


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
        state[f"sparse.tables.{name}.weight"] = index(model.sparse.tables[name].weight.detach(), 1, dims)

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
            state[f"{prefix}.linear.weight"] = cols_rows(layer.linear.weight, P, P)
            state[f"{prefix}.linear.bias"] = index(layer.linear.bias.detach(), 0, P)

    previous = slice_deep(model, plan.neurons, P, state)

    if model.parallel:
        deep_columns = [s.width + j for j in plan.neurons[-1]] if model.deep is not None else []
        head_columns = P + deep_columns
    else:
        head_columns = previous  # the last deep layer's kept rows, or P without a deep network
    state["head.weight"] = cols_rows(model.head.weight, None, head_columns)
    state["head.bias"] = model.head.bias.detach().clone()
    return rebuild(DCNv2, structure, state, model)
