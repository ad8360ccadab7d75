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


def assemble(shapes: dict[str, list[int]], pieces: list[dict[str, list[tuple[list[int], Tensor]]]]
             ) -> dict[str, Tensor]:
    """{table name: full tensor} from the ranks' {name: [(offsets, tensor)]}; every element must be covered."""
    out = {}
    for name, shape in shapes.items():
        full = torch.empty(shape)
        covered = torch.zeros(shape, dtype=torch.bool)
        for part in pieces:
            for offsets, tensor in part.get(name, []):
                where = tuple(slice(o, o + n) for o, n in zip(offsets, tensor.shape))
                full[where] = tensor
                covered[where] = True
        if not bool(covered.all()):
            raise ValueError(f"the table shards of {name} do not cover the table ({shape})")
        out[name] = full
    return out


def is_table_key(key: str) -> bool:
    """A module state-dict key of a table: `model.sparse.groups.<g>.weight` or the per-table
    `model.sparse.tables.<name>.weight`."""
    return key.startswith(("model.sparse.groups.", "model.sparse.tables."))


def read_checkpoint(path: str | Path, tables: bool = True) -> dict:
    """A Lightning checkpoint of ours with every table whole in `state_dict` (a sharded one assembled), or
    with `tables=False` without any table (nor the fused optimizer's table-shaped state)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=not tables)
    info = checkpoint.get(SHARDED_KEY)
    if not tables:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not is_table_key(k)}
    elif info is not None:
        pieces = []
        for p in shard_paths(path, int(info["world_size"])):
            if not p.exists():
                raise FileNotFoundError(f"{path} is a sharded checkpoint; its table shards {p} are missing")
            pieces.append(torch.load(p, map_location="cpu", weights_only=False))
        for name, table in assemble(info["shapes"], pieces).items():
            checkpoint["state_dict"][f"model.sparse.tables.{name}.weight"] = table
        if info.get("optimizer_shapes"):
            checkpoint[OPTIMIZER_STATE_KEY] = assemble(info["optimizer_shapes"], pieces)
    return checkpoint
