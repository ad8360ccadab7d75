"""The DDP comm hook for sparse gradients (umec_lightning/distributed.py), in two real gloo processes."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from umec_lightning.distributed import sparse_allgather_hook, sparse_average


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        # Ranks with different row sets, one rank with a repeated (uncoalesced) row and more rows.
        rows = [torch.tensor([[0, 3]]), torch.tensor([[3, 5, 5, 7]])][rank]
        values = torch.arange(rows.shape[1] * 2, dtype=torch.float32).reshape(-1, 2) + 10 * rank
        grad = torch.sparse_coo_tensor(rows, values, (8, 2), check_invariants=True)
        mean = sparse_average(grad)
        # A real DDP step with the hook: a sparse table and a dense layer, as the module trains them.
        torch.manual_seed(0)
        model = nn.Sequential(nn.EmbeddingBag(10, 3, mode="sum", sparse=True), nn.Linear(3, 1))
        ddp = nn.parallel.DistributedDataParallel(model)
        ddp.register_comm_hook(None, sparse_allgather_hook)
        ids = torch.tensor([[1], [2], [2]]) if rank == 0 else torch.tensor([[2], [9]])
        ddp(ids).sum().backward()
        torch.save({"mean": mean.to_dense(), "table": model[0].weight.grad.to_dense(),
                    "linear": model[1].weight.grad}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sparse_average_and_ddp_hook_match_the_dense_mean(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    expected = torch.zeros(8, 2)
    expected[0] += torch.tensor([0.0, 1.0])
    expected[3] += torch.tensor([2.0, 3.0]) + torch.tensor([10.0, 11.0])
    expected[5] += torch.tensor([12.0, 13.0]) + torch.tensor([14.0, 15.0])
    expected[7] += torch.tensor([16.0, 17.0])
    expected /= 2
    for r in (r0, r1):
        torch.testing.assert_close(r["mean"], expected)
    # Both ranks hold the same averaged gradients; the table's is the mean of the two ranks' own.
    torch.testing.assert_close(r0["table"], r1["table"])
    torch.testing.assert_close(r0["linear"], r1["linear"])
    torch.manual_seed(0)
    model = nn.Sequential(nn.EmbeddingBag(10, 3, mode="sum", sparse=True), nn.Linear(3, 1))
    grads = []
    for ids in (torch.tensor([[1], [2], [2]]), torch.tensor([[2], [9]])):
        model.zero_grad()
        model(ids).sum().backward()
        grads.append((model[0].weight.grad.to_dense(), model[1].weight.grad.clone()))
    torch.testing.assert_close(r0["table"], (grads[0][0] + grads[1][0]) / 2)
    torch.testing.assert_close(r0["linear"], (grads[0][1] + grads[1][1]) / 2)


def test_trainer_ddp_uses_the_hook_and_other_strategies_pass_through():
    from pytorch_lightning.strategies import DDPStrategy

    from umec_lightning.stages import make_strategy

    strategy = make_strategy("ddp")
    assert isinstance(strategy, DDPStrategy) and strategy._ddp_comm_hook is sparse_allgather_hook
    assert make_strategy("auto") == "auto" and make_strategy("ddp_spawn") == "ddp_spawn"
