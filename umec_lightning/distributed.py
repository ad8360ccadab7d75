"""Data-parallel training of the embedding tables that have sparse gradients, outside DDP's reducer.

DDP averages the dense parameters (MLPs, projections, gates) as usual; the tables with `sparse=True` are
left out of it (`_ddp_params_and_buffers_to_ignore`) and averaged here, after the backward, from the
training step's own thread: every rank all-gathers the (padded) indices and values of its coalesced
gradient, and the sum of all of them over the world size is the mean gradient. Dense collectives only, so
it works under NCCL (which has no sparse all-reduce) as under gloo.

Why not DDP's own sparse path: under gloo on CPU (torch 2.13) DDP's sparse all-reduce at times corrupted the
heap ("malloc(): unaligned tcache chunk detected" in one rank during the first backward, then "Connection reset
by peer" in the other). Doing the same all-gather as a DDP comm hook (inside the reducer, during the backward,
beside its asynchronous dense all-reduce) still aborted some runs (how often: docs/distributed.md). Out of the
reducer, no collective is in flight when these run. This is also how the sharded path treats tables (torchrec's
model parallel for the tables, DDP for the rest).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn


def sparse_tables(module: nn.Module) -> dict[str, nn.Parameter]:
    """{qualified name: weight} of the Embedding/EmbeddingBag modules with sparse gradients in `module`."""
    return {f"{name}.weight" if name else "weight": m.weight for name, m in module.named_modules()
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse}


def _all_gather_padded(tensor: Tensor, lengths: list[int], group) -> list[Tensor]:
    """Every rank's `tensor` (first dim lengths[r]), gathered with equal-size messages."""
    longest = max(lengths)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    out = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(out, padded.contiguous(), group=group)
    return [part[:n] for part, n in zip(out, lengths)]


def sparse_average(grad: Tensor, group=None) -> Tensor:
    """The mean over ranks of a sparse COO gradient (B, D) rows, via all-gather; coalesced."""
    world = dist.get_world_size(group)
    grad = grad.coalesce()
    indices, values = grad.indices().t().contiguous(), grad.values()  # (nnz, sparse_dim), (nnz, *dense)
    count = torch.tensor([indices.shape[0]], dtype=torch.long, device=grad.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    lengths = [int(c) for c in counts]
    all_indices = torch.cat(_all_gather_padded(indices, lengths, group))
    all_values = torch.cat(_all_gather_padded(values, lengths, group))
    total = torch.sparse_coo_tensor(all_indices.t(), all_values, grad.shape, check_invariants=False).coalesce()
    return total / world


def average_gradients(params: Iterable[nn.Parameter], group=None) -> None:
    """Replace each parameter's gradient by its mean over the ranks, in place of DDP.

    A sparse gradient is averaged by `sparse_average`, a dense one (a table that a dense penalty gradient
    made dense) by all-reduce. A missing gradient counts as zero, so every rank runs the same collectives.
    """
    world = dist.get_world_size(group)
    for param in params:
        grad = param.grad
        if grad is None:
            grad = torch.sparse_coo_tensor(torch.empty((1, 0), dtype=torch.long, device=param.device),
                                           param.new_empty((0, *param.shape[1:])), param.shape)
        if grad.is_sparse:
            param.grad = sparse_average(grad, group)
        else:
            dist.all_reduce(grad, group=group)
            param.grad = grad.div_(world)


def broadcast_parameters(params: Iterable[nn.Parameter], src: int = 0, group=None) -> None:
    """Make every rank hold rank `src`'s values (DDP does this for the parameters it owns)."""
    with torch.no_grad():
        for param in params:
            dist.broadcast(param.data, src=src, group=group)


def from_rank_zero(compute):
    """`compute()` run on rank 0 and its (picklable) result handed to every rank; `compute()` alone when no
    process group runs. For a decision only rank 0 can make (under trainer=torchrec it alone holds the tables) or
    that every rank must make alike (under DDP each rank sees other batches)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return compute()
    box = [compute() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
