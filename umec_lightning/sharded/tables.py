"""The tables of a sharded DLRM (a DMP of `ebc.ebc_shell`) to and from whole tensors: loading rank 0's tables
of record into every rank's local shards and gathering them back (`CHUNK_BYTES` at a time), this rank's
checkpoint pieces of the tables and of the fused optimizer's state, and what each rank holds. Padding columns
(`ebc.padded_width`) never leave here: whole tables and checkpoint pieces have the real widths.
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


# A table moves between rank 0 and the shards in row blocks of at most this many bytes, so no rank ever
# holds more than one block of a table it does not own (rank 0 holds the tables of record whole).
CHUNK_BYTES = 64 * 2**20


def _parts(value, replicated_on_rank_zero: bool = False) -> list[tuple[list[int], torch.Tensor]]:
    """This rank's (offsets, tensor) of a table-shaped tensor: the local shards of a ShardedTensor, all of a
    replicated one (a data-parallel table; with `replicated_on_rank_zero`, on rank 0 only, so that the
    ranks' parts together hold each element once), none of None (a state this rank holds no shard of)."""
    if value is None:
        return []
    if isinstance(value, ShardedTensor):
        return [(list(s.metadata.shard_offsets), s.tensor) for s in value.local_shards()]
    if replicated_on_rank_zero and dist.get_rank() != 0:
        return []
    return [([0] * value.dim(), value)]


def _row_blocks(shape: list[int]):
    """(lo, hi) row ranges of a (rows[, width]) float32 tensor, each at most CHUNK_BYTES."""
    width = shape[1] if len(shape) == 2 else 1
    step = max(1, CHUNK_BYTES // (4 * width))
    for lo in range(0, shape[0], step):
        yield lo, min(shape[0], lo + step)


def _overlap(offsets, part: torch.Tensor, lo: int, hi: int, width: int):
    """Where rows [lo, hi) of the whole tensor (real width `width`) meet `part` at `offsets`: (index into the
    part, index into the block) of the same elements, or None; a part's columns past `width` (padding) are
    left out."""
    r0 = offsets[0]
    a, b = max(lo, r0), min(hi, r0 + part.shape[0])
    if a >= b:
        return None
    rows_part, rows_block = slice(a - r0, b - r0), slice(a - lo, b - lo)
    if part.dim() == 1:
        return (rows_part,), (rows_block,)
    c0 = offsets[1]
    cols = max(0, min(part.shape[1], width - c0))
    return (rows_part, slice(0, cols)), (rows_block, slice(c0, c0 + cols))


def scatter_from_rank_zero(value, whole: torch.Tensor | None, shape: list[int], device) -> None:
    """Rank 0's `whole` tensor (real `shape`; None elsewhere) into every rank's part of `value` (None: a rank
    holding none), broadcast in row blocks (a collective of every rank, in the same order). A part's padding
    columns get zeros."""
    rank0 = dist.get_rank() == 0
    width = shape[1] if len(shape) == 2 else 1
    parts = _parts(value)
    for lo, hi in _row_blocks(shape):
        if rank0:
            block = whole[lo:hi].to(device=device, dtype=torch.float32).contiguous()
        else:
            block = torch.empty([hi - lo, *shape[1:]], dtype=torch.float32, device=device)
        dist.broadcast(block, src=0)
        for offsets, part in parts:
            where = _overlap(offsets, part, lo, hi, width)
            if where is None:
                continue
            into, out_of = where
            part[into].copy_(block[out_of])
            if part.dim() == 2:
                part[into[0], into[1].stop:].zero_()


def reduce_to_rank_zero(value, whole: torch.Tensor | None, shape: list[int], device) -> None:
    """The inverse: every rank's part of `value` into rank 0's `whole` (real `shape`), in row blocks summed
    onto rank 0 (each element lives in one shard, so the sum of zeros and it is it; a replicated tensor is
    taken from rank 0 alone). A collective of every rank."""
    rank0 = dist.get_rank() == 0
    width = shape[1] if len(shape) == 2 else 1
    parts = _parts(value, replicated_on_rank_zero=True)
    for lo, hi in _row_blocks(shape):
        block = torch.zeros([hi - lo, *shape[1:]], dtype=torch.float32, device=device)
        for offsets, part in parts:
            where = _overlap(offsets, part, lo, hi, width)
            if where is not None:
                out_of, into = where
                block[into].copy_(part[out_of].detach())
        dist.reduce(block, dst=0)
        if rank0:
            whole[lo:hi].copy_(block)


def _tables(dmp: DistributedModelParallel):
    """(name, value, real shape) of every table, in the state dict's order (the same on every rank)."""
    dims = _dims(dmp)
    for key, value in dmp.state_dict().items():
        name = table_name(key)
        if name is not None:
            yield name, value, [int(value.size(0)), dims[name]]


def load_tables(dmp: DistributedModelParallel, tables: dict[str, torch.Tensor] | None) -> None:
    """Rank 0's whole tables {name: (rows, dim)} (None on the other ranks) into every rank's local shards (on
    CPU DMP does not copy them); a collective."""
    with torch.no_grad():
        for name, value, shape in _tables(dmp):
            scatter_from_rank_zero(value, tables[name] if tables is not None else None, shape, dmp.device)


def gather_tables(dmp: DistributedModelParallel, tables: dict[str, torch.Tensor] | None) -> None:
    """The trained shards into rank 0's whole tables {name: (rows, dim)} (None on the other ranks, which get
    nothing); a collective."""
    with torch.no_grad():
        for name, value, shape in _tables(dmp):
            reduce_to_rank_zero(value, tables[name] if tables is not None else None, shape, dmp.device)


def _local(value, dim: int) -> list[tuple[list[int], torch.Tensor]]:
    """This rank's (offsets, block) of a table-shaped tensor (a ShardedTensor, or a replicated one, which
    rank 0 alone reports), columns past the real width `dim` (padding) cut off."""
    shards = _parts(value, replicated_on_rank_zero=True)
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
    pieces, shapes = {}, {}
    for name, value, shape in _tables(dmp):
        shapes[name], pieces[name] = shape, _local(value, shape[1])
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


def load_optimizer_states(dmp: DistributedModelParallel, states: dict[str, torch.Tensor] | None) -> None:
    """Rank 0's whole states {`optimizer/<state key>`: tensor} (None elsewhere; None or empty on rank 0:
    nothing to load) into the fused optimizer's local shards; a collective. Rank 0 names the states and
    their shapes: a rank's fused optimizer lists only the tables it holds shards of."""
    shapes = [sorted((k, list(v.shape)) for k, v in (states or {}).items())]
    dist.broadcast_object_list(shapes, src=0)
    local = {f"{OPTIMIZER_PREFIX}{state_key}": value for _, state_key, value in _fused_states(dmp)}
    with torch.no_grad():
        for key, shape in shapes[0]:
            whole = states[key] if dist.get_rank() == 0 else None
            scatter_from_rank_zero(local.get(key), whole, shape, dmp.device)


def plan_tables(dmp: DistributedModelParallel) -> dict:
    """{table name: its ParameterSharding} of the plan `dmp` was sharded by."""
    return {name: p for tables in dmp.plan.plan.values() for name, p in tables.items()}


def table_memory(dmp: DistributedModelParallel) -> dict:
    """What the plan put where (a collective): {"bytes_per_rank": [bytes of rank r's local table shards],
    "sharding": {table: type}, "ranks": {table: [ranks holding a shard]}}. A data-parallel table counts
    whole on every rank."""
    local = sum(t.numel() * t.element_size() for _, value, _ in _tables(dmp) for _, t in _parts(value))
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
