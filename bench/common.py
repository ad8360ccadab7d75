"""Shared bits of the benchmarks: the Kaggle-sized model and Zipf-distributed batches."""

from __future__ import annotations

import statistics
import time

import torch

from umec_lightning.models import DLRM, dense_structure

KAGGLE_SIZES = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27,
                14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]
MODELS = {
    "dlrm_kaggle": dict(embedding_dim=16, bottom=[512, 256, 64, 16], top=[512, 256, 1], interaction="dot"),
    "dlrm_kaggle_cat": dict(embedding_dim=16, bottom=[512, 256, 64, 16], top=[512, 256, 1], interaction="cat"),
}


def kaggle_model(name: str = "dlrm_kaggle", table_scale: float = 1.0, device: str = "cpu") -> DLRM:
    sizes = [max(1, int(n * table_scale)) for n in KAGGLE_SIZES]
    structure = dense_structure(sparse_names=[f"C{i}" for i in range(1, 27)], table_sizes=sizes,
                                num_dense=13, **MODELS[name])
    return DLRM(structure, seed=0).to(device)


def zipf_batches(model: DLRM, batch: int, count: int, device: str = "cpu", seed: int = 0):
    """Batches whose ids follow a Zipf-like law (heavy head, long tail), like real CTR traffic."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor(model.structure.table_sizes, dtype=torch.float64)
    out = []
    for _ in range(count):
        u = torch.rand(batch, len(sizes), generator=g, dtype=torch.float64)
        ids = (sizes ** u - 1).long().clamp_max(sizes.long() - 1)  # log-uniform ranks ≈ Zipf(1)
        dense = torch.rand(batch, 13, generator=g).mul(5)
        label = (torch.rand(batch, generator=g) < 0.25).float()
        out.append((dense.to(device), ids.to(device), label.to(device)))
    return out


def timed(fn, batches, warmup: int = 10, sync=lambda: None) -> list[float]:
    for b in batches[:warmup]:
        fn(*b)
    sync()
    times = []
    for b in batches[warmup:]:
        t0 = time.perf_counter()
        fn(*b)
        sync()
        times.append(time.perf_counter() - t0)
    return times


def median_ms(times: list[float]) -> float:
    return 1000 * statistics.median(times)
