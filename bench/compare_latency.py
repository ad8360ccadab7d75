"""Inference latency of several saved models, measured in one process, interleaved: every repeat times each
model once, in turn, so a load spike on this shared machine hits all of them alike. Reports the median ms
per model and batch size, and each model's per-round ratio to the first one (median, 25th-75th percentile),
with `umec_lightning.latency.compare_latency`, the routine behind summary.json's `latency_ms`.

    .venv/bin/python bench/compare_latency.py dense=<run>/checkpoints/pretrain/best.ckpt \\
        joint=<run>/compressed.pt magnitude=<run>/compressed.pt --batches 1 2048 --repeats 50 --threads 1

A `name=path` is a `compressed.pt` (`load_compressed`) or a Lightning checkpoint of the dense model (rebuilt
from the structure it records).
"""

from __future__ import annotations

import argparse
import json

import torch

from umec_lightning import load_compressed
from umec_lightning.latency import compare_latency
from umec_lightning.models import DLRM, DLRMStructure


def load_any(path: str) -> DLRM:
    if path.endswith(".pt"):
        return load_compressed(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = DLRM(DLRMStructure.from_dict(ckpt["dlrm_structure"]))
    model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()})
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="name=path (the first one is the reference of the ratios)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2048])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    models = {}
    for item in args.models:
        name, _, path = item.partition("=")
        if not path:
            parser.error(f"expected name=path, got {item!r}")
        models[name] = load_any(path)
    # The same routine as summary.json's latency_ms: interleaved rounds, per-round ratios with their spread.
    print(json.dumps(compare_latency(models, args.batches, args.repeats, threads=args.threads), indent=2))


if __name__ == "__main__":
    main()
