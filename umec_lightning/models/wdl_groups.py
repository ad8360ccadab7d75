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

from ..compression.groups import GroupMember, GroupSet, _block_labels, _blocks
from ..compression.kept import Kept
from .deep_parts import (
    check_dim_block,
    check_kinds,
    dense_group_incidence,
    dims_incidence,
    feature_incidence,
    kept_from_liveness,
    kept_table_dims,
    neuron_sets,
    read_masks,
    table_offsets,
)
from .wdl import WDL

WDL_KINDS = frozenset({"feature", "dim", "neuron"})


def x_reader(model: WDL) -> nn.Linear:
    """The Linear that reads x: deep layer 0, or the head without a deep network."""
    return model.deep.layers[0] if model.deep is not None else model.head


def wdl_group_sets(model: WDL, kinds, dim_block: int = 1) -> list[GroupSet]:
    kinds = check_kinds(kinds, WDL_KINDS, "a Wide & Deep model")
    s = model.structure
    reader = x_reader(model)
    device = reader.weight.device
    width = s.width
    _, starts = table_offsets(s)
    ud = int(s.use_dense)
    sets: list[GroupSet] = []
    if "feature" in kinds:
        gate = model.enable_dim_gate()
        labels, inc = feature_incidence(s, width, device)
        g = len(labels)
        gate_inc = torch.eye(g, device=device)  # the gate is [dense (iff read), features]: one entry per group
        members = [GroupMember(gate, 0, gate_inc), GroupMember(reader.weight, 1, inc)]
        if ud:
            members.append(GroupMember(model.wide.weight, 1, dense_group_incidence(s, g, device)))
        sets.append(GroupSet("features", "feature", members, labels))
    if "neuron" in kinds:
        sets += neuron_sets(model, device)
    if "dim" in kinds:
        b = check_dim_block(dim_block)
        for name, start, d in zip(s.feature_names, starts, s.table_dims):
            if d == 0:  # a table left with its wide weights alone: no dim to prune
                continue
            inc = dims_incidence(width, [start], _blocks(d, b, device, f"table {name}"))
            sets.append(GroupSet(f"dims:{name}", "dim", [GroupMember(reader.weight, 1, inc)], _block_labels(d, b),
                                 width=b))
    return sets


def wdl_kept_from_masks(model: WDL, sets: list[GroupSet], pruned: dict[str, Tensor]) -> Kept:
    """The structure left when the groups marked in `pruned` (set name -> bool (G,)) are removed (sets absent from
    `pruned` keep everything), in `model`'s numbering. ValueError when no input or no neuron of a deep layer is
    left."""
    s = model.structure
    by_name, gone = read_masks(s, sets, pruned)
    ud = int(s.use_dense)
    dims = kept_table_dims(s, by_name, pruned)
    alive = [not gone[ud + f] for f in range(s.num_features)]
    return kept_from_liveness(model, pruned, gone, alive, dims)
