"""Each input feature's held-out worth for a trained model: the validation loss increase when the feature is
held at its mean vector (`umec_lightning.compression.ablation`), lowest first, planted noise marked.

    .venv/bin/python bench/feature_ablation.py <run>/checkpoints/pretrain/best.ckpt --cache <UMEC_CACHE>/<data dir>
        [--split val] [--rows 40960] [--batch 4096] [--threads 1]

The checkpoint is a Lightning checkpoint of the dense model or a `compressed.pt`; the cache is the data
directory a run printed ("reusing cache ...").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.compare_latency import load_any  # noqa: E402
from umec_lightning.compression.ablation import mean_ablation_scores  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--cache", required=True, type=Path)
    p.add_argument("--split", default="val")
    p.add_argument("--rows", type=int, default=40960)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_any(args.checkpoint)
    meta = json.loads((args.cache / "meta.json").read_text())
    arrays = [np.load(args.cache / f"{args.split}_{k}.npy", mmap_mode="r")[: args.rows]
              for k in ("dense", "sparse", "label")]
    batches = []
    for lo in range(0, len(arrays[2]), args.batch):
        dense, sparse, label = (a[lo : lo + args.batch] for a in arrays)
        batches.append((torch.from_numpy(np.array(dense, dtype=np.float32)),
                        torch.from_numpy(sparse.astype(np.int64)), torch.from_numpy(label.astype(np.float32))))
    scores = mean_ablation_scores(model, batches)
    noise = set(meta.get("noise_features") or [])
    for name, value in sorted(scores.items(), key=lambda kv: kv[1]):
        print(f"{name:8s} {'noise' if name in noise else '     '} {value:+.5f}")
    print(json.dumps({"bench": "feature_ablation", "split": args.split, "rows": len(arrays[2]), "scores": scores}))


if __name__ == "__main__":
    main()
