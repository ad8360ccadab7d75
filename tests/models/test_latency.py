"""compare_latency: interleaved timing, per-round ratios with their spread, the thread count restored."""

import time

import torch

from umec_lightning.latency import compare_latency
from umec_lightning.models import DLRM, dense_structure


def model(width):
    s = dense_structure(sparse_names=["a", "b"], table_sizes=[10, 20], embedding_dim=4, bottom=[8, 4],
                        top=[width, 1], num_dense=3)
    return DLRM(s, seed=0)


class Slow(torch.nn.Module):
    """A DLRM that takes 2 ms longer per forward: its ratio to the plain one must show it."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.structure = inner, inner.structure

    def forward(self, dense, sparse):
        time.sleep(0.002)
        return self.inner(dense, sparse)


def test_ratios_are_per_round_with_spread_and_threads_are_restored():
    before = torch.get_num_threads()
    base = model(8)
    out = compare_latency({"dense": base, "slow": Slow(model(8))}, batches=(1, 16), repeats=9, threads=1)
    assert out["threads"] == 1 and out["repeats"] == 9 and torch.get_num_threads() == before
    assert set(out["ms"]) == {"dense", "slow"} and set(out["ratio"]) == {"slow"}
    for key in ("batch_1", "batch_16"):
        r = out["ratio"]["slow"][key]
        assert r["p25"] <= r["median"] <= r["p75"]
        assert r["median"] > 1.5  # +2 ms on a sub-millisecond forward
        assert out["ms"]["slow"][key] > out["ms"]["dense"][key] + 1.5
    assert base.training  # modes restored
