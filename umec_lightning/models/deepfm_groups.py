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

from ..compression.groups import KINDS, GroupMember, GroupSet, _block_labels, _blocks, _kept_list
from ..compression.kept import Kept
from .deepfm import DeepFM

DEEPFM_KINDS = frozenset({"feature", "dim", "neuron"})


def _x_offsets(s) -> list[int]:
    """The first x column of every table."""
    head = s.num_dense if s.use_dense else 0
    return [head + f * s.embedding_dim for f in range(s.num_features)]


def deepfm_group_sets(model: DeepFM, kinds, dim_block: int = 1) -> list[GroupSet]:
    kinds = set(kinds)
    unknown = kinds - set(KINDS)
    if unknown:
        raise ValueError(f"unknown group kinds {sorted(unknown)}; choose from {KINDS}")
    if kinds - DEEPFM_KINDS:
        raise ValueError(f"group kinds {sorted(kinds - DEEPFM_KINDS)} do not exist in a DeepFM (it has "
                         f"{', '.join(sorted(DEEPFM_KINDS))})")
    s = model.structure
    device = model.head.weight.device
    reader = model.x_reader()
    width = s.deep_in
    starts = _x_offsets(s)
    ud, nf, dim = int(s.use_dense), s.num_features, s.embedding_dim
    gate = model.enable_dim_gate() if kinds & {"feature", "dim"} else None
    sets: list[GroupSet] = []
    if "feature" in kinds:
        labels = (["dense"] if ud else []) + s.feature_names
        groups = len(labels)
        gate_inc = torch.zeros(gate.numel(), groups, device=device)
        gate_inc[: ud + nf] = torch.eye(ud + nf, device=device)
        x_inc = torch.zeros(width, groups, device=device)
        if ud:
            x_inc[: s.num_dense, 0] = 1.0
        for f, start in enumerate(starts):
            x_inc[start: start + dim, ud + f] = 1.0
        members = [GroupMember(gate, 0, gate_inc), GroupMember(reader.weight, 1, x_inc)]
        if ud:
            first_inc = torch.zeros(s.num_dense, groups, device=device)
            first_inc[:, 0] = 1.0
            members.append(GroupMember(model.first_order.weight, 1, first_inc))
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
        blocks = _blocks(dim, b, device, "the embedding dim")
        gate_inc = torch.zeros(gate.numel(), blocks.shape[1], device=device)
        gate_inc[ud + nf:] = blocks
        x_inc = torch.zeros(width, blocks.shape[1], device=device)
        for start in starts:
            x_inc[start: start + dim] = blocks
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
    dims = _kept_list(pruned.get("dims"), s.embedding_dim, by_name["dims"].width if "dims" in by_name else 1)
    if not dims:
        raise ValueError("every shared embedding dim is pruned: nothing left for the FM")
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
                dims={name: list(dims) for name, keep in zip(s.feature_names, alive) if keep},
                neurons=neurons, pairs=None)
