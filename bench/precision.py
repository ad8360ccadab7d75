"""fp32 against bf16 autocast (what `trainer.precision=bf16-mixed` runs): one training step of dlrm_kaggle.

The two precisions alternate step by step on the same batches (interleaved, so a loaded machine slows both
alike); the median of each and their ratio are printed per batch size, with the thread count.
    python bench/precision.py [--batches 128 2048] [--steps 100] [--table-scale 0.1] [--threads 1]
Weights stay fp32 under autocast (the embedding lookups and the SGD step too); the MLP matmuls run in bf16.
On a CUDA machine the same comparison runs on the GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import kaggle_model, median_ms, zipf_batches  # noqa: E402


def make_step(model, device: str, bf16: bool):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(dense, sparse, label):
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            logits = model(dense, sparse)
        loss = F.binary_cross_entropy_with_logits(logits.float(), label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def compare(batch: int, steps: int, table_scale: float, device: str) -> dict:
    base = kaggle_model(table_scale=table_scale, device=device)
    models = {"fp32": base, "bf16": copy.deepcopy(base)}
    steps_by = {name: make_step(m, device, name == "bf16") for name, m in models.items()}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    batches = zipf_batches(base, batch, steps + 10, device)
    times = {name: [] for name in models}
    for i, b in enumerate(batches):
        for name, step in steps_by.items():  # interleaved
            sync()
            t0 = time.perf_counter()
            step(*b)
            sync()
            if i >= 10:
                times[name].append(time.perf_counter() - t0)
    fp32, bf16 = median_ms(times["fp32"]), median_ms(times["bf16"])
    return {"device": device, "batch": batch, "fp32_ms": round(fp32, 3), "bf16_ms": round(bf16, 3),
            "bf16_speedup": round(fp32 / bf16, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[128, 2048])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--table-scale", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads: {torch.get_num_threads()}, table scale {args.table_scale}")
    results = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for batch in args.batches:
            steps = args.steps if batch <= 512 else max(30, args.steps // 3)
            row = compare(batch, steps, args.table_scale, device)
            results.append(row)
            print(f"{device} batch {batch}: fp32 {row['fp32_ms']} ms, bf16 {row['bf16_ms']} ms, "
                  f"speed-up {row['bf16_speedup']}x", flush=True)
    print(json.dumps({"bench": "precision", "threads": torch.get_num_threads(), "results": results}))


if __name__ == "__main__":
    main()
