"""Inference latency of a DLRM on this machine: median wall time of a forward pass, per batch size."""

from __future__ import annotations

import statistics
import time

import torch

from .models import DLRM


def random_inputs(model: DLRM, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (B, N) and sparse (B, S) inputs valid for `model` (ids within each kept table)."""
    s = model.structure
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(batch, s.num_dense, generator=g) * 3
    sparse = torch.zeros(batch, len(s.sparse_names), dtype=torch.long)
    for fid, rows in zip(s.feature_ids, s.table_sizes):
        sparse[:, fid] = torch.randint(0, rows, (batch,), generator=g)
    return dense, sparse


@torch.inference_mode()
def latency_ms(model: DLRM, batches=(1, 2048), repeats: int = 30, seed: int = 0) -> dict[str, float]:
    """{"batch_<B>": median ms} over `repeats` forward passes after 3 warm-ups (CPU or the model's device)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {}
    for batch in batches:
        dense, sparse = (t.to(device) for t in random_inputs(model, int(batch), seed))
        for _ in range(3):
            model(dense, sparse)
        sync()
        times = []
        for _ in range(int(repeats)):
            t0 = time.perf_counter()
            model(dense, sparse)
            sync()
            times.append(time.perf_counter() - t0)
        out[f"batch_{batch}"] = round(1000 * statistics.median(times), 4)
    model.train(was_training)
    return out
