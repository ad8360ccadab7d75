"""Dense training throughput of dlrm_kaggle with Kaggle-sized tables (33.8 M rows).

Two figures per batch size:
  compute: forward + BCE + backward + SGD (sparse embedding gradients) on pre-made batches;
  wall:    the real path, `Trainer.fit` of our CTRModule over a memory-mapped cache (loader, Lightning
           overhead and logging included), samples per second of the training loop.
    python bench/train_step.py [--batches 128 2048] [--steps 200] [--table-scale 1.0] [--skip-wall]
On a CUDA machine it also times the compute loop on the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import kaggle_model, median_ms, timed, zipf_batches  # noqa: E402


def compute_samples_per_second(model, batch: int, steps: int, device: str) -> float:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(dense, sparse, label):
        loss = F.binary_cross_entropy_with_logits(model(dense, sparse), label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = timed(step, zipf_batches(model, batch, steps + 10, device), sync=sync)
    return batch / (median_ms(times) / 1000)


def wall_samples_per_second(model, batch: int, steps: int) -> float:
    """The real training path: CTRDataModule over a synthetic cache with Kaggle-sized vocabularies."""
    import pytorch_lightning as pl
    from umec_lightning.callbacks.throughput import Throughput

    from umec_lightning.data import CTRDataModule, SyntheticCriteo
    from umec_lightning.module import CTRModule

    rows = batch * (steps + 20)
    with tempfile.TemporaryDirectory() as tmp:
        source = SyntheticCriteo(rows={"train": rows, "val": 1000, "test": 1000},
                                 cardinalities=list(model.structure.table_sizes), seed=0)
        dm = CTRDataModule(source, cache_root=tmp, batch_size=batch, eval_batch_size=4096)
        module = CTRModule(model, lr=0.1, phase="bench", log_every_n_steps=50)
        tp = Throughput()
        trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, limit_val_batches=0, callbacks=[tp],
                             enable_model_summary=False, use_distributed_sampler=False)
        trainer.fit(module, datamodule=dm)
        return tp.samples_per_second


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[128, 2048])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--table-scale", type=float, default=1.0)
    p.add_argument("--skip-wall", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    model = kaggle_model(table_scale=args.table_scale)
    print(f"model built in {time.perf_counter() - t0:.1f}s, {sum(model.structure.table_sizes):,} table rows, "
          f"{torch.get_num_threads()} threads")
    results = []
    for batch in args.batches:
        steps = args.steps if batch <= 512 else max(40, args.steps // 4)
        row = {"batch": batch, "cpu_compute_sps": round(compute_samples_per_second(model, batch, steps, "cpu"))}
        if not args.skip_wall:
            row["cpu_wall_sps"] = round(wall_samples_per_second(model, batch, steps))
        if torch.cuda.is_available():
            gpu = kaggle_model(table_scale=args.table_scale, device="cuda")
            row["gpu_compute_sps"] = round(compute_samples_per_second(gpu, batch, steps * 4, "cuda"))
            del gpu
        results.append(row)
        print(row, flush=True)
    print(json.dumps({"bench": "train_step", "results": results}))


if __name__ == "__main__":
    main()
