"""Inference latency of DLRMs on this machine: median wall time of a forward pass, per batch size.

`compare_latency` is the routine every comparison uses (summary.json, bench/compare_latency.py): the models
are timed interleaved, one forward each in turn per round, at a fixed thread count, so a load spike on a
shared machine hits all of them alike; it reports each model's median and, per round, its time over the
first model's, as a median ratio with its spread (25th-75th percentile).
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch
from torch import nn

from .models import DLRM


class Loaded(nn.Module):
    """A model read back from an exported file (TorchScript, or a whole `torch.save`d module), carrying the
    structure `random_inputs` draws its inputs from, so that `compare_latency` times it like the eager ones."""

    def __init__(self, loaded: nn.Module, structure):
        super().__init__()
        self.loaded, self.structure = loaded, structure  # `compare_latency` finds the device in its parameters

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return self.loaded(dense, sparse)


def random_inputs(model: DLRM, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (B, N) and sparse (B, S) inputs valid for `model` (ids within each kept table)."""
    s = model.structure
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(batch, s.num_dense, generator=g) * 3
    sparse = torch.zeros(batch, len(s.sparse_names), dtype=torch.long)
    for fid, rows in zip(s.feature_ids, s.table_sizes):
        sparse[:, fid] = torch.randint(0, rows, (batch,), generator=g)
    return dense, sparse


def latency_ms(model: DLRM, batches=(1, 2048), repeats: int = 30, seed: int = 0) -> dict[str, float]:
    """{"batch_<B>": median ms} of one model over `repeats` forward passes after 3 warm-ups, at the current
    thread count (`compare_latency` with a single model)."""
    return compare_latency({"model": model}, batches, repeats, threads=None, seed=seed)["ms"]["model"]


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@contextmanager
def _threads(count: int | None):
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(int(count))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def compare_latency(models: dict[str, DLRM], batches=(1, 2048), repeats: int = 30, threads: int | None = 1,
                    seed: int = 0) -> dict:
    """Interleaved timing of `models` (the first is the reference). Returns
    {"threads", "repeats", "ms": {name: {"batch_<B>": median ms}},
     "ratio": {name: {"batch_<B>": {"median", "p25", "p75"}}}} — ratios per round, to the first model."""
    names = list(models)
    states = {name: m.training for name, m in models.items()}
    ms = {name: {} for name in names}
    ratio = {name: {} for name in names[1:]}
    devices = {name: next(m.parameters()).device for name, m in models.items()}
    syncs = {name: torch.cuda.synchronize if d.type == "cuda" else (lambda: None) for name, d in devices.items()}
    with _threads(threads) as used:
        for batch in batches:
            key = f"batch_{batch}"
            inputs = {}
            for name, m in models.items():
                m.eval()
                inputs[name] = tuple(t.to(devices[name]) for t in random_inputs(m, int(batch), seed))
                for _ in range(3):
                    m(*inputs[name])
            times = {name: [] for name in names}
            for _ in range(int(repeats)):
                for name, m in models.items():
                    sync = syncs[name]
                    sync()
                    t0 = time.perf_counter()
                    m(*inputs[name])
                    sync()
                    times[name].append(time.perf_counter() - t0)
            for name in names:
                ms[name][key] = round(1000 * statistics.median(times[name]), 4)
            ref = times[names[0]]
            for name in names[1:]:
                rounds = [t / max(r, 1e-12) for t, r in zip(times[name], ref)]
                ratio[name][key] = {"median": round(statistics.median(rounds), 4),
                                    "p25": round(_quantile(rounds, 0.25), 4),
                                    "p75": round(_quantile(rounds, 0.75), 4)}
    for name, m in models.items():
        m.train(states[name])
    return {"threads": used, "repeats": int(repeats), "ms": ms, "ratio": ratio}
