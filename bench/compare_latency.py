"""Inference latency of several saved models, measured in one process, interleaved: every repeat times each
model once, in turn, so a load spike on this shared machine hits all of them alike. Reports the median ms
per model and batch size, and each model's ratio to the first one.

    .venv/bin/python bench/compare_latency.py dense=<run>/checkpoints/pretrain/best.ckpt \\
        joint=<run>/compressed.pt magnitude=<run>/compressed.pt --batches 1 2048 --repeats 50 --threads 1

A `name=path` is a `compressed.pt` (`load_compressed`) or a Lightning checkpoint of the dense model (rebuilt
from the structure it records).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from umec_lightning import load_compressed
from umec_lightning.latency import random_inputs
from umec_lightning.models import DLRM, DLRMStructure


def load_any(path: str) -> DLRM:
    if path.endswith(".pt"):
        return load_compressed(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = DLRM(DLRMStructure.from_dict(ckpt["dlrm_structure"]))
    model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()})
    return model


@torch.inference_mode()
def compare(models: dict[str, DLRM], batches: list[int], repeats: int) -> dict:
    out = {}
    for batch in batches:
        inputs = {name: random_inputs(m, batch, seed=0) for name, m in models.items()}
        for name, m in models.items():  # warm-up
            m.eval()
            for _ in range(3):
                m(*inputs[name])
        times = {name: [] for name in models}
        for _ in range(repeats):
            for name, m in models.items():
                t0 = time.perf_counter()
                m(*inputs[name])
                times[name].append(time.perf_counter() - t0)
        medians = {name: 1000 * statistics.median(t) for name, t in times.items()}
        first = next(iter(medians.values()))
        out[f"batch_{batch}"] = {name: {"ms": round(v, 4), "ratio": round(v / first, 3)} for name, v in medians.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="name=path (the first one is the reference of the ratios)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2048])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {}
    for item in args.models:
        name, _, path = item.partition("=")
        if not path:
            parser.error(f"expected name=path, got {item!r}")
        models[name] = load_any(path)
    result = compare(models, args.batches, args.repeats)
    print(json.dumps({"threads": args.threads, "repeats": args.repeats, **result}, indent=2))


if __name__ == "__main__":
    main()
