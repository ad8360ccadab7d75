"""The tables of a sharded DLRM (a DMP of `ebc.ebc_shell`) to and from whole tensors: loading the plain model's
tables into the local shards, gathering them back, this rank's checkpoint pieces of the tables and of the
fused optimizer's state, and what each rank holds. Padding columns (`ebc.padded_width`) never leave here:
whole tables and checkpoint pieces have the real widths.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed import DistributedModelParallel

from .checkpoint import OPTIMIZER_PREFIX

_TABLES = "sparse.ebc.embedding_bags."  # the EBC's tables in the sharded model's state dict


def table_name(key: str) -> str | None:
    """The table a sharded model's state-dict key belongs to ("C1"), or None for any other weight."""
    return key[len(_TABLES):].split(".")[0] if key.startswith(_TABLES) else None


def _dims(dmp: DistributedModelParallel) -> dict[str, int]:
    """Each table's real width (its stored width may be padded: `ebc.padded_width`)."""
    return dmp.module.sparse.dims


def _block(full: torch.Tensor, offsets, sizes) -> torch.Tensor:
    """The (sizes) block of `full` at `offsets`, zero where it reaches past `full`'s columns (padding); a
    1-D `full` (a per-row state) is cut by rows alone."""
    if full.dim() == 1:
        return full[offsets[0]: offsets[0] + sizes[0]]
    out = full.new_zeros(list(sizes))
    r, c = offsets
    cols = max(0, min(sizes[1], full.shape[1] - c))
    out[:, :cols] = full[r: r + sizes[0], c: c + cols]
    return out


def _copy_into(value, full: torch.Tensor) -> None:
    """Copy the whole tensor `full` (real width) into this rank's part of `value`: the local shards of a
    ShardedTensor, or all of a replicated tensor (a data-parallel table); padding columns get zeros."""
    if isinstance(value, ShardedTensor):
        for s in value.local_shards():
            s.tensor.copy_(_block(full, s.metadata.shard_offsets, s.metadata.shard_sizes))
    else:
        value.copy_(_block(full, [0] * value.dim(), value.shape))


def load_tables(dmp: DistributedModelParallel, tables: dict[str, torch.Tensor]) -> None:
    """Copy whole tables {name: (rows, dim)} into `dmp`'s local shards (on CPU DMP does not copy them)."""
    with torch.no_grad():
        for key, value in dmp.state_dict().items():
            name = table_name(key)
            if name is not None:
                _copy_into(value, tables[name])


def _local(value, dim: int) -> list[tuple[list[int], torch.Tensor]]:
    """This rank's (offsets, block) of a table-shaped tensor (a ShardedTensor, or a replicated one, which
    rank 0 alone reports), columns past the real width `dim` (padding) cut off."""
    if isinstance(value, ShardedTensor):
        shards = [(list(s.metadata.shard_offsets), s.tensor) for s in value.local_shards()]
    else:
        shards = [([0] * value.dim(), value)] if dist.get_rank() == 0 else []
    if value.dim() == 1:  # a per-row state (row-wise optimizers)
        return [(offsets, t.detach().clone()) for offsets, t in shards]
    return [(offsets, t[:, : max(0, dim - offsets[1])].detach().clone()) for offsets, t in shards
            if offsets[1] < dim]


def _real_shape(value, dim: int) -> list[int]:
    shape = [int(n) for n in value.size()]
    return shape[:1] + [dim] if len(shape) == 2 else shape


def local_pieces(dmp: DistributedModelParallel) -> tuple[dict[str, list], dict[str, list[int]]]:
    """This rank's {table name: [(offsets, tensor)]} and every table's full shape, padding cut off
    (data-parallel tables: the whole table, from rank 0 only)."""
    pieces, shapes, dims = {}, {}, _dims(dmp)
    for key, value in dmp.state_dict().items():
        name = table_name(key)
        if name is not None:
            shapes[name] = _real_shape(value, dims[name])
            pieces[name] = _local(value, dims[name])
    return pieces, shapes


def _fused_states(dmp: DistributedModelParallel):
    """(table name, state key such as "C1.momentum1", tensor) of the fused table optimizer's state."""
    for param_key, states in dmp.fused_optimizer.state_dict()["state"].items():
        for state_key, value in states.items():
            yield table_name(param_key) or param_key, state_key, value


def optimizer_pieces(dmp: DistributedModelParallel) -> tuple[dict[str, list], dict[str, list[int]]]:
    """Like `local_pieces`, for the fused optimizer's state (Adagrad's accumulators; SGD has none), keyed
    `optimizer/<state key>`. A rank's fused optimizer lists only the tables it holds shards of, so the
    shapes are gathered from every rank (a collective)."""
    pieces, shapes, dims = {}, {}, _dims(dmp)
    for name, state_key, value in _fused_states(dmp):
        key = f"{OPTIMIZER_PREFIX}{state_key}"
        shapes[key] = _real_shape(value, dims[name])
        pieces[key] = _local(value, dims[name])
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, shapes)
    return pieces, {k: v for rank_shapes in every for k, v in rank_shapes.items()}


def load_optimizer_states(dmp: DistributedModelParallel, states: dict[str, torch.Tensor]) -> None:
    """Copy whole states {`optimizer/<state key>`: tensor} into the fused optimizer's local shards."""
    with torch.no_grad():
        for _, state_key, value in _fused_states(dmp):
            _copy_into(value, states[f"{OPTIMIZER_PREFIX}{state_key}"])


def gather_tables(dmp: DistributedModelParallel):
    """Every table whole (padding cut off), on every rank, one at a time: yields (name, table on the
    sharded model's device), each gathered when asked for (a collective), so one table is whole at a time."""
    dims = _dims(dmp)
    for key, value in dmp.state_dict().items():
        name = table_name(key)
        if name is None:
            continue
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype, device=dmp.device)
            value.gather(dst=0, out=full if dist.get_rank() == 0 else None)
            dist.broadcast(full, src=0)
        else:
            full = value.detach()
        yield name, full[:, : dims[name]]


def plan_tables(dmp: DistributedModelParallel) -> dict:
    """{table name: its ParameterSharding} of the plan `dmp` was sharded by."""
    return {name: p for tables in dmp.plan.plan.values() for name, p in tables.items()}


def table_memory(dmp: DistributedModelParallel) -> dict:
    """What the plan put where (a collective): {"bytes_per_rank": [bytes of rank r's local table shards],
    "sharding": {table: type}, "ranks": {table: [ranks holding a shard]}}. A data-parallel table counts
    whole on every rank."""
    local = 0
    for key, value in dmp.state_dict().items():
        if table_name(key) is None:
            continue
        shards = [s.tensor for s in value.local_shards()] if isinstance(value, ShardedTensor) else [value]
        local += sum(t.numel() * t.element_size() for t in shards)
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, local)
    sharding, ranks = {}, {}
    for name, p in plan_tables(dmp).items():
        sharding[name] = p.sharding_type
        ranks[name] = sorted(set(p.ranks)) if p.ranks is not None else list(range(len(per_rank)))
    return {"bytes_per_rank": [int(b) for b in per_rank], "sharding": sharding, "ranks": ranks}


def dense_state(dmp: DistributedModelParallel) -> dict[str, torch.Tensor]:
    """The sharded model's weights other than its sharded tables, under the plain DLRM's names."""
    return {k: v for k, v in dmp.state_dict().items() if table_name(k) is None}
