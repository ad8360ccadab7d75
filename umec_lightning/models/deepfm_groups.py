"""DeepFM's group sets, and the structure their masks leave (`models.family`: `FAMILY.group_sets`,
`FAMILY.kept_from_masks`).

x = [dense (N, iff read) | e_1 (D) | … | e_F (D)] is read by deep layer 0 (the head without a deep network), "the
x reader". The FM reads the tables themselves, so x-reader columns alone cannot remove a feature or a dim: the
feature and dim sets also hold the model's compression gate (`DeepFM.enable_dim_gate`, created here: build the
sets before the optimizer), whose zero removes exactly (module docstring of `models/deepfm.py`). Tables are not
members, as under DLRM.

Sets, in order:
    "features" (feature)   groups ["dense"] (iff read) + the feature names. Members: the gate's feature entries,
                           the x reader's columns of the block (dense: N, feature f: its D), and the first-order
                           Linear's weight (the dense group's).
    "neurons:deep.layers.<i>" (neuron)  a deep layer's output rows (a batch-normalised layer's (γ, β), as DLRM's).
    "dims" (dim, width b)  the shared embedding dims, b at a time: the gate's dim entries (the first member: ADMM
                           clamps a "dims" set's first member at >= 0, as DLRM's gate) and column off_f + k of the
                           x reader for every table f.
Liveness (shared with `DeepFMResourceModel`): the dense block lives iff its feature group is kept; a table iff its
feature group is kept (and a shared dim is, which every mask keeps).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..compression.groups import GroupMember, GroupSet, _block_labels, _blocks, _kept_list
from ..compression.kept import Kept
from .deep_parts import (
    check_dim_block,
    check_kinds,
    dense_group_incidence,
    dims_incidence,
    feature_incidence,
    kept_from_liveness,
    neuron_sets,
    read_masks,
    table_offsets,
)
from .deepfm import DeepFM

DEEPFM_KINDS = frozenset({"feature", "dim", "neuron"})


def deepfm_group_sets(model: DeepFM, kinds, dim_block: int = 1) -> list[GroupSet]:
    kinds = check_kinds(kinds, DEEPFM_KINDS, "a DeepFM")
    s = model.structure
    device = model.head.weight.device
    reader = model.x_reader()
    width = s.deep_in
    _, starts = table_offsets(s)  # every table D wide
    ud, nf, dim = int(s.use_dense), s.num_features, s.embedding_dim
    gate = model.enable_dim_gate() if kinds & {"feature", "dim"} else None
    sets: list[GroupSet] = []
    if "feature" in kinds:
        labels, x_inc = feature_incidence(s, width, device)
        groups = len(labels)
        gate_inc = torch.zeros(gate.numel(), groups, device=device)
        gate_inc[: ud + nf] = torch.eye(ud + nf, device=device)
        members = [GroupMember(gate, 0, gate_inc), GroupMember(reader.weight, 1, x_inc)]
        if ud:
            members.append(GroupMember(model.first_order.weight, 1, dense_group_incidence(s, groups, device)))
        sets.append(GroupSet("features", "feature", members, labels))
    if "neuron" in kinds:
        sets += neuron_sets(model, device)
    if "dim" in kinds:
        b = check_dim_block(dim_block)
        blocks = _blocks(dim, b, device, "the embedding dim")
        gate_inc = torch.zeros(gate.numel(), blocks.shape[1], device=device)
        gate_inc[ud + nf:] = blocks
        x_inc = dims_incidence(width, starts, blocks)
        members = [GroupMember(gate, 0, gate_inc)]  # the gate first (see the module docstring)
        if nf:
            members.append(GroupMember(reader.weight, 1, x_inc))
        sets.append(GroupSet("dims", "dim", members, _block_labels(dim, b), width=b))
    return sets


def deepfm_kept_from_masks(model: DeepFM, sets: list[GroupSet], pruned: dict[str, Tensor]) -> Kept:
    """The structure left when the groups marked in `pruned` (set name -> bool (G,)) are removed (sets absent from
    `pruned` keep everything), in `model`'s numbering. ValueError when no input, no shared dim or no neuron of a
    deep layer is left."""
    s = model.structure
    by_name, gone = read_masks(s, sets, pruned)
    ud = int(s.use_dense)
    dims = _kept_list(pruned.get("dims"), s.embedding_dim, by_name["dims"].width if "dims" in by_name else 1)
    if not dims:
        raise ValueError("every shared embedding dim is pruned: nothing left for the FM")
    alive = [not gone[ud + f] for f in range(s.num_features)]
    return kept_from_liveness(model, pruned, gone, alive, {name: list(dims) for name in s.feature_names})
