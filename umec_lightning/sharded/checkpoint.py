"""The checkpoint of a sharded run, and reading any of our checkpoints as one unsharded state dict.

Format: `<name>.ckpt` is an ordinary Lightning checkpoint written by rank 0 (loop and callback state, the
dense optimizer's state, and in `state_dict` every weight but the sharded tables, under the plain DLRM's
names), plus `sharded_tables` = {"world_size": W, "shapes": {table name: [rows, dim]}, "optimizer_shapes":
{"optimizer/<state>": shape}}; each rank r writes `<name>.ckpt.tables-<r>-of-<W>`: {table name or
"optimizer/<state>" (the fused optimizer's, e.g. Adagrad's "optimizer/C1.momentum1"): [(offsets, tensor),
...]}, its local shards of each (a data-parallel table: the whole table, from rank 0 only; padding columns
cut off). Plain torch.save files, read without torchrec.

`read_checkpoint` assembles the tables from every rank's file into `state_dict` under the per-table keys
`model.sparse.tables.<name>.weight`, which a plain DLRM loads (`SparseArch.fuse_table_keys_`), and the
fused optimizer's states whole under `sharded_optimizer_state` (what a resume loads into the new shards): a sharded
checkpoint loads into an unsharded model (`pretrained=`, best-on-validation weights) and, resharded, into
a sharded one of any plan or world size (resume). `tables=False` (a rank that does not hold the tables of
record) reads no table at all: no shard file, and a plain checkpoint's table tensors are mapped, not read,
and dropped.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

SHARDED_KEY = "sharded_tables"
OPTIMIZER_PREFIX = "optimizer/"  # the fused table optimizer's state in the shard files: optimizer/C1.momentum1
OPTIMIZER_STATE_KEY = "sharded_optimizer_state"  # read_checkpoint: those states, whole


def shard_path(path: str | Path, rank: int, world_size: int) -> Path:
    return Path(f"{path}.tables-{rank}-of-{world_size}")


def shard_paths(path: str | Path, world_size: int) -> list[Path]:
    return [shard_path(path, r, world_size) for r in range(world_size)]


def assemble(shapes: dict[str, list[int]], pieces, into: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """{name: whole tensor} of `shapes` from the ranks' {name: [(offsets, tensor)]} (`pieces`: an iterable,
    read one rank's at a time, e.g. a generator loading the shard files), written into `into`'s tensors in
    place when given (no second copy of the tables). Every element must be covered once."""
    out = into if into is not None else {name: torch.empty(shape) for name, shape in shapes.items()}
    for name, shape in shapes.items():
        if name not in out or list(out[name].shape) != list(shape):
            found = list(out[name].shape) if name in out else "nothing"
            raise ValueError(f"table shards of {name} have shape {list(shape)}, to be read into {found}")
    covered = dict.fromkeys(shapes, 0)
    for part in pieces:
        for name, blocks in part.items():
            if name not in shapes:
                continue
            for offsets, tensor in blocks:
                if any(o < 0 or o + n > size for o, n, size in zip(offsets, tensor.shape, shapes[name])):
                    raise ValueError(f"a table shard of {name} at {list(offsets)} ({list(tensor.shape)}) lies "
                                     f"outside the table ({shapes[name]})")
                out[name][tuple(slice(o, o + n) for o, n in zip(offsets, tensor.shape))] = tensor
                covered[name] += tensor.numel()
    for name, shape in shapes.items():  # the shards of a plan never overlap: a count tells a gap
        if covered[name] != math.prod(shape):
            raise ValueError(f"the table shards of {name} do not cover the table ({shape})")
    return {name: out[name] for name in shapes}


def is_table_key(key: str) -> bool:
    """A module state-dict key of a table: `model.sparse.groups.<g>.weight` or the per-table
    `model.sparse.tables.<name>.weight`."""
    return key.startswith(("model.sparse.groups.", "model.sparse.tables."))


def _shard_files(path: str | Path, world_size: int):
    """Each rank's shard file of checkpoint `path`, loaded (memory-mapped) one at a time."""
    for p in shard_paths(path, world_size):
        if not p.exists():
            raise FileNotFoundError(f"{path} is a sharded checkpoint; its table shards {p} are missing")
        yield torch.load(p, map_location="cpu", weights_only=False, mmap=True)


def read_checkpoint(path: str | Path, tables: bool = True, into: dict[str, Tensor] | None = None) -> dict:
    """A Lightning checkpoint of ours with every table whole in `state_dict` (a sharded one assembled), or
    with `tables=False` without any table (nor the fused optimizer's table-shaped state).

    `into` {table name: (rows, d) tensor}: a sharded checkpoint's tables are assembled into those tensors
    in place (e.g. a model's own tables: no second copy) and left out of `state_dict`; `checkpoint
    [SHARDED_KEY]` then says so. ValueError when a table's shape is not its tensor's."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=not tables)
    info = checkpoint.get(SHARDED_KEY)
    if not tables:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not is_table_key(k)}
    elif info is not None:
        world = int(info["world_size"])
        assembled = assemble(info["shapes"], _shard_files(path, world), into)
        if into is None:
            for name, table in assembled.items():
                checkpoint["state_dict"][f"model.sparse.tables.{name}.weight"] = table
        if info.get("optimizer_shapes"):
            checkpoint[OPTIMIZER_STATE_KEY] = assemble(info["optimizer_shapes"], _shard_files(path, world))
    return checkpoint


def read_checkpoint_into(model, path: str | Path) -> dict:
    """Checkpoint `path` read for a CTRModule around the DLRM `model`, its `state_dict` complete for the
    module's `load_state_dict`. A model holding its tables (rank 0's) gets a sharded checkpoint's tables
    assembled straight into its own (no second copy of the tables: the state dict then carries the
    model's own tensors, which load onto themselves); a model without (`DLRM.holds_tables` False, the
    other ranks) reads no table and gets meta placeholders."""
    holds = model.holds_tables
    into = {name: view.weight.detach() for name, view in model.sparse.tables.items()} if holds else None
    checkpoint = read_checkpoint(path, tables=holds, into=into)
    if not holds:
        checkpoint["state_dict"].update(model.table_placeholders("model."))
    elif checkpoint.get(SHARDED_KEY) is not None:
        own = model.state_dict()
        checkpoint["state_dict"].update({f"model.{k}": own[k] for k in model.table_keys()})
    return checkpoint
