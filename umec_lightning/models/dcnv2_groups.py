"""DCNv2's group sets, and the structure their masks leave (`models.family`: `FAMILY.group_sets`,
`FAMILY.kept_from_masks`).

Every group is a set of x0 positions (a feature: its table's columns, or the dense block's; a dim: one column, or
`dim_block` consecutive ones) or a deep neuron. An x0 position j lives in every reader of x0: row and column j of
each cross matrix (full rank W; the mixture's U rows, V and gate columns) and the cross bias, column j of the
first deep layer, and column j of the head (parallel). Those slices are the group's members: its norm is their
energy, and zeroing them removes the position exactly (a zero coordinate of x0 stays zero through every cross layer,
x_{l+1,j} = 0·(…) + x_{l,j}). The tables themselves are not members, as under DLRM.

Sets, in order: "features" (groups: ["dense"] if the dense block is read, then the features), "neurons:deep.layers.
<i>" (a batch-normalised layer's group is its channel's (γ, β), as DLRM's), "dims:<feature>" (per table, groups of
`dim_block` columns). Liveness (shared with `DCNv2ResourceModel`): the dense block lives iff its feature group is
kept; a table iff its feature group is kept and it keeps a dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..compression.groups import GroupMember, GroupSet, _block_labels, _blocks
from ..compression.kept import Kept
from .dcnv2 import CrossLayer, DCNv2
from .deep_parts import (
    check_dim_block,
    check_kinds,
    dims_incidence,
    feature_incidence,
    kept_from_liveness,
    kept_table_dims,
    neuron_sets,
    read_masks,
    table_offsets,
)

DCNV2_KINDS = frozenset({"feature", "dim", "neuron"})


def _x0_readers(model: DCNv2) -> list[tuple[nn.Parameter, int]]:
    """Every (parameter, axis) whose slices along the axis are x0 positions, in a fixed order."""
    out: list[tuple[nn.Parameter, int]] = []
    for layer in model.cross.layers:
        if isinstance(layer, CrossLayer):
            out += [(layer.linear.weight, 0), (layer.linear.weight, 1), (layer.linear.bias, 0)]
        else:
            out += [(v.weight, 1) for v in layer.v] + [(u.weight, 0) for u in layer.u]
            out += [(g.weight, 1) for g in layer.gates] + [(layer.bias, 0)]
    if model.deep is not None:
        out.append((model.deep.layers[0].weight, 1))
    if model.parallel or model.deep is None:  # the head reads the cross output, x0-wide, first
        out.append((model.head.weight, 1))
    return out


def _members(model: DCNv2, incidence: Tensor) -> list[GroupMember]:
    """The members of groups over x0 positions: `incidence` (W, G) on every reader (the head's (in, G) rows past
    W, the deep part in parallel, stay 0)."""
    members = []
    for param, axis in _x0_readers(model):
        n = param.shape[axis]
        inc = incidence if n == incidence.shape[0] else torch.cat(
            [incidence, incidence.new_zeros(n - incidence.shape[0], incidence.shape[1])])
        members.append(GroupMember(param, axis, inc))
    return members


def dcnv2_group_sets(model: DCNv2, kinds, dim_block: int = 1) -> list[GroupSet]:
    kinds = check_kinds(kinds, DCNV2_KINDS, "a DCNv2")
    s = model.structure
    device = model.head.weight.device
    width = s.width
    _, starts = table_offsets(s)
    sets: list[GroupSet] = []
    if "feature" in kinds:
        labels, inc = feature_incidence(s, width, device)
        sets.append(GroupSet("features", "feature", _members(model, inc), labels))
    if "neuron" in kinds:
        sets += neuron_sets(model, device)
    if "dim" in kinds:
        b = check_dim_block(dim_block)
        for name, start, d in zip(s.feature_names, starts, s.table_dims):
            inc = dims_incidence(width, [start], _blocks(d, b, device, f"table {name}"))
            sets.append(GroupSet(f"dims:{name}", "dim", _members(model, inc), _block_labels(d, b), width=b))
    return sets


def dcnv2_kept_from_masks(model: DCNv2, sets: list[GroupSet], pruned: dict[str, Tensor]) -> Kept:
    """The structure left when the groups marked in `pruned` (set name -> bool (G,)) are removed (sets absent from
    `pruned` keep everything), in `model`'s numbering. ValueError when nothing of x0 or of a deep layer is left."""
    s = model.structure
    by_name, gone = read_masks(s, sets, pruned)
    ud = int(s.use_dense)
    dims = kept_table_dims(s, by_name, pruned)
    alive = [not gone[ud + f] and len(dims[name]) > 0 for f, name in enumerate(s.feature_names)]
    return kept_from_liveness(model, pruned, gone, alive, dims)
