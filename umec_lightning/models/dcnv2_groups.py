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

from ..compression.groups import KINDS, GroupMember, GroupSet, _block_labels, _blocks, _kept_list
from ..compression.kept import Kept
from .dcnv2 import CrossLayer, DCNv2

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


def _offsets(s) -> tuple[int, list[int]]:
    """(width of the dense block in x0, the first x0 column of every table)."""
    head = s.num_dense if s.use_dense else 0
    starts, col = [], head
    for d in s.table_dims:
        starts.append(col)
        col += d
    return head, starts


def dcnv2_group_sets(model: DCNv2, kinds, dim_block: int = 1) -> list[GroupSet]:
    kinds = set(kinds)
    unknown = kinds - set(KINDS)
    if unknown:
        raise ValueError(f"unknown group kinds {sorted(unknown)}; choose from {KINDS}")
    if kinds - DCNV2_KINDS:
        raise ValueError(f"group kinds {sorted(kinds - DCNV2_KINDS)} do not exist in a DCNv2 (it has "
                         f"{', '.join(sorted(DCNV2_KINDS))})")
    s = model.structure
    device = model.head.weight.device
    width = s.width
    head, starts = _offsets(s)
    ud = int(s.use_dense)
    sets: list[GroupSet] = []
    if "feature" in kinds:
        labels = (["dense"] if ud else []) + s.feature_names
        inc = torch.zeros(width, len(labels), device=device)
        if ud:
            inc[:head, 0] = 1.0
        for f, (start, d) in enumerate(zip(starts, s.table_dims)):
            inc[start: start + d, ud + f] = 1.0
        sets.append(GroupSet("features", "feature", _members(model, inc), labels))
    if "neuron" in kinds and model.deep is not None:
        norms = model.batch_norms()
        for i, layer in enumerate(model.deep.layers):
            name = f"deep.layers.{i}"
            eye = torch.eye(layer.out_features, device=device)
            params = (norms[name].weight, norms[name].bias) if name in norms else (layer.weight, layer.bias)
            sets.append(GroupSet(f"neurons:{name}", "neuron", [GroupMember(p, 0, eye) for p in params],
                                 [str(j) for j in range(layer.out_features)]))
    if "dim" in kinds:
        b = int(dim_block)
        if b < 1:
            raise ValueError(f"config key `mode.method.admm.dim_block` must be a positive integer, got {dim_block!r}")
        for name, start, d in zip(s.feature_names, starts, s.table_dims):
            blocks = _blocks(d, b, device, f"table {name}")
            inc = torch.zeros(width, blocks.shape[1], device=device)
            inc[start: start + d] = blocks
            sets.append(GroupSet(f"dims:{name}", "dim", _members(model, inc), _block_labels(d, b), width=b))
    return sets


def dcnv2_kept_from_masks(model: DCNv2, sets: list[GroupSet], pruned: dict[str, Tensor]) -> Kept:
    """The structure left when the groups marked in `pruned` (set name -> bool (G,)) are removed (sets absent from
    `pruned` keep everything), in `model`'s numbering. ValueError when nothing of x0 or of a deep layer is left."""
    s = model.structure
    by_name = {gs.name: gs for gs in sets}
    unknown = set(pruned) - set(by_name)
    if unknown:
        raise ValueError(f"masks for unknown group sets {sorted(unknown)}")
    for name, m in pruned.items():
        if m.numel() != by_name[name].num_groups:
            raise ValueError(f"mask for {name} has {m.numel()} entries, the set has {by_name[name].num_groups}")
    ud = int(s.use_dense)
    feat = pruned.get("features")
    gone = [False] * (ud + s.num_features) if feat is None else [bool(x) for x in feat.cpu()]
    dims = {name: _kept_list(pruned.get(f"dims:{name}"), d, by_name[f"dims:{name}"].width
                             if f"dims:{name}" in by_name else 1)
            for name, d in zip(s.feature_names, s.table_dims)}
    alive = [not gone[ud + f] and len(dims[name]) > 0 for f, name in enumerate(s.feature_names)]
    use_dense = bool(ud) and not gone[0]
    if not use_dense and not any(alive):
        raise ValueError("the masks prune every input (dense block and all tables)")
    neurons = {}
    for i, layer in enumerate(model.deep.layers if model.deep is not None else []):
        name = f"deep.layers.{i}"
        neurons[name] = _kept_list(pruned.get(f"neurons:{name}"), layer.out_features)
        if not neurons[name]:
            raise ValueError(f"the masks prune every neuron of {name}")
    return Kept(use_dense=use_dense,
                feature_ids=[fid for fid, keep in zip(s.feature_ids, alive) if keep],
                dims={name: dims[name] for name, keep in zip(s.feature_names, alive) if keep},
                neurons=neurons, pairs=None)
