"""Wide & Deep's group sets, and the structure their masks leave (`models.family`: `FAMILY.group_sets`,
`FAMILY.kept_from_masks`).

x = [dense, e_1 … e_F] is read by one layer: deep layer 0 (the head when there is no deep network), "the x reader".
The wide part reads the tables themselves (each table's last column) and the dense block (the wide Linear), so
x-reader columns alone cannot remove an input: the feature set also holds the model's compression gate
(`WDL.enable_dim_gate`, created here: build the sets before the optimizer), whose entry g_f scales feature f's whole
lookup, wide weight included (module docstring of `models/wdl.py`). Tables are never members: no step reads a
table (group norms are read every ADMM step, and a table may have 10 M rows or be meta).

    "features" (feature)       groups ["dense"] (iff read), then the features. Members: the gate's entries, the x
                               reader's columns of the block (dense: N, feature f: its D_f), and the wide Linear's
                               weights (the dense group's; not its bias: extraction folds it into the head's).
    "neurons:deep.layers.<i>"  one group per neuron (a batch-normalised layer's: its channel's (γ, β), as DLRM's)
    "dims:<feature>"           blocks of `dim_block` of the table's D_f embedding columns, as columns of the x reader
                               (never the wide weight: a table with every dim pruned keeps its wide weights)

Zeroing a group's members removes it exactly: a zero gate entry zeroes that input's whole lookup (its embedding, its
wide weight) or the dense block (deep input and wide Linear alike); a zero column of the x reader ignores that x
position. Liveness (shared with `WDLResourceModel` and the surgery): the dense block lives iff its feature group is
kept; a table iff its feature group is kept, whatever dims it keeps (D'_f = 0 leaves its wide column alone).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..compression.groups import KINDS, GroupMember, GroupSet, _block_labels, _blocks, _kept_list
from ..compression.kept import Kept
from .wdl import WDL

WDL_KINDS = frozenset({"feature", "dim", "neuron"})


def x_reader(model: WDL) -> nn.Linear:
    """The Linear that reads x: deep layer 0, or the head without a deep network."""
    return model.deep.layers[0] if model.deep is not None else model.head


def _offsets(s) -> tuple[int, list[int]]:
    """(width of the dense block in x, the first x column of every table)."""
    head = s.num_dense if s.use_dense else 0
    starts, col = [], head
    for d in s.table_dims:
        starts.append(col)
        col += d
    return head, starts


def wdl_group_sets(model: WDL, kinds, dim_block: int = 1) -> list[GroupSet]:
    kinds = set(kinds)
    unknown = kinds - set(KINDS)
    if unknown:
        raise ValueError(f"unknown group kinds {sorted(unknown)}; choose from {KINDS}")
    if kinds - WDL_KINDS:
        raise ValueError(f"group kinds {sorted(kinds - WDL_KINDS)} do not exist in a Wide & Deep model (it has "
                         f"{', '.join(sorted(WDL_KINDS))})")
    s = model.structure
    reader = x_reader(model)
    device = reader.weight.device
    width = s.width
    head, starts = _offsets(s)
    ud = int(s.use_dense)
    sets: list[GroupSet] = []
    if "feature" in kinds:
        gate = model.enable_dim_gate()
        labels = (["dense"] if ud else []) + s.feature_names
        g = len(labels)
        gate_inc = torch.eye(g, device=device)  # the gate is [dense (iff read), features]: one entry per group
        inc = torch.zeros(width, g, device=device)
        if ud:
            inc[:head, 0] = 1.0
        for f, (start, d) in enumerate(zip(starts, s.table_dims)):
            inc[start: start + d, ud + f] = 1.0
        members = [GroupMember(gate, 0, gate_inc), GroupMember(reader.weight, 1, inc)]
        if ud:
            wide_inc = torch.zeros(s.num_dense, g, device=device)
            wide_inc[:, 0] = 1.0
            members.append(GroupMember(model.wide.weight, 1, wide_inc))
        sets.append(GroupSet("features", "feature", members, labels))
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
            if d == 0:  # a table left with its wide weights alone: no dim to prune
                continue
            blocks = _blocks(d, b, device, f"table {name}")
            inc = torch.zeros(width, blocks.shape[1], device=device)
            inc[start: start + d] = blocks
            sets.append(GroupSet(f"dims:{name}", "dim", [GroupMember(reader.weight, 1, inc)], _block_labels(d, b),
                                 width=b))
    return sets


def wdl_kept_from_masks(model: WDL, sets: list[GroupSet], pruned: dict[str, Tensor]) -> Kept:
    """The structure left when the groups marked in `pruned` (set name -> bool (G,)) are removed (sets absent from
    `pruned` keep everything), in `model`'s numbering. ValueError when no input or no neuron of a deep layer is
    left."""
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
    alive = [not gone[ud + f] for f in range(s.num_features)]
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
