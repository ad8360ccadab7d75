"""Sparse tables averaged outside DDP (umec_lightning/distributed.py), in two real gloo processes."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from umec_lightning.distributed import average_gradients, broadcast_parameters, sparse_average, sparse_tables


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _model() -> nn.Sequential:
    return nn.Sequential(nn.EmbeddingBag(10, 3, mode="sum", sparse=True), nn.Linear(3, 1))


RANK_IDS = (torch.tensor([[1], [2], [2]]), torch.tensor([[2], [9]]))


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # Ranks with different row sets, one rank with a repeated (uncoalesced) row and more rows.
        rows = [torch.tensor([[0, 3]]), torch.tensor([[3, 5, 5, 7]])][rank]
        values = torch.arange(rows.shape[1] * 2, dtype=torch.float32).reshape(-1, 2) + 10 * rank
        mean = sparse_average(torch.sparse_coo_tensor(rows, values, (8, 2), check_invariants=True))
        # A real DDP step as the module runs it: the sparse table left out of DDP, averaged after backward.
        torch.manual_seed(rank)  # different initial tables: the broadcast must make them rank 0's
        model = _model()
        tables = sparse_tables(model)
        assert list(tables) == ["0.weight"]
        model._ddp_params_and_buffers_to_ignore = list(tables)
        broadcast_parameters(tables.values())
        initial = model[0].weight.detach().clone()
        ddp = nn.parallel.DistributedDataParallel(model)
        ddp(RANK_IDS[rank]).sum().backward()
        average_gradients(tables.values())
        # A dense table gradient (a penalty made it dense) and a missing one on one rank only.
        dense = nn.Parameter(torch.zeros(4, 2))
        dense.grad = torch.full((4, 2), float(rank + 1))
        missing = nn.Parameter(torch.zeros(5, 2))
        if rank == 1:
            missing.grad = torch.sparse_coo_tensor(torch.tensor([[4]]), torch.tensor([[2.0, 4.0]]), (5, 2))
        average_gradients([dense, missing])
        torch.save({"mean": mean.to_dense(), "initial": initial, "table": model[0].weight.grad.to_dense(),
                    "linear": model[1].weight.grad, "dense": dense.grad, "missing": missing.grad.to_dense()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        # DDP's reducer holds the gloo group: released, and both ranks done, before the group goes (else a rank
        # could abort at exit, "terminate called without an active exception", about one run in ten).
        del ddp
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_sparse_tables_averaged_outside_ddp_match_the_single_process_mean(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    expected = torch.zeros(8, 2)
    expected[0] += torch.tensor([0.0, 1.0])
    expected[3] += torch.tensor([2.0, 3.0]) + torch.tensor([10.0, 11.0])
    expected[5] += torch.tensor([12.0, 13.0]) + torch.tensor([14.0, 15.0])
    expected[7] += torch.tensor([16.0, 17.0])
    expected /= 2
    torch.manual_seed(0)
    model = _model()
    for r in (r0, r1):
        torch.testing.assert_close(r["mean"], expected)
        torch.testing.assert_close(r["initial"], model[0].weight.detach())  # rank 0's table on both
        torch.testing.assert_close(r["dense"], torch.full((4, 2), 1.5))
        torch.testing.assert_close(r["missing"], torch.tensor([[0.0, 0.0]] * 4 + [[1.0, 2.0]]))
    # Both ranks hold the mean of the two ranks' own gradients, the table's as DDP's layer's.
    grads = []
    for ids in RANK_IDS:
        model.zero_grad()
        model(ids).sum().backward()
        grads.append((model[0].weight.grad.to_dense(), model[1].weight.grad.clone()))
    for r in (r0, r1):
        torch.testing.assert_close(r["table"], (grads[0][0] + grads[1][0]) / 2)
        torch.testing.assert_close(r["linear"], (grads[0][1] + grads[1][1]) / 2)
