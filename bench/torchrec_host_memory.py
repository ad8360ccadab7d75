"""Host memory per rank under trainer=torchrec: the peak resident set (VmHWM) of every rank's process.

One train.py run, `mode=dense` for one short epoch on synthetic data whose 26 tables have `--rows-per-table`
rows each (embedding dim 16: 26·rows·64 bytes of tables), on `--ranks` CPU processes (gloo). While it runs,
every process of the run is polled for its peak RSS (/proc/<pid>/status VmHWM, monotonic; Linux only); the
last reading of each rank is its peak. Rank 0 is the launching process, rank r its r-th child.

    python bench/torchrec_host_memory.py [--ranks 2] [--rows-per-table 200000] [--code DIR] [--out DIR]
                                         [override ...]      # e.g. pretrained=<a checkpoint of this model>

`--code DIR`: run another checkout's train.py (e.g. an older commit's snapshot) on the same data, for a
before/after comparison; one run at a time, so run the two one after the other and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def children(pid: int) -> list[int]:
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return sorted({int(c) for t in tasks for c in (t / "children").read_text().split()})
    except (FileNotFoundError, ProcessLookupError):
        return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--rows-per-table", type=int, default=200_000)
    parser.add_argument("--train-rows", type=int, default=8192)
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose train.py runs")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cache", type=Path, default=None, help="data cache root (shared between runs)")
    parser.add_argument("overrides", nargs="*", help="more train.py overrides, e.g. pretrained=<ckpt>")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="torchrec_host_memory_"))
    cache = args.cache or out / "cache"
    rows = args.train_rows
    overrides = [
        "data=synthetic", f"data.rows={{train:{rows},val:{rows // 4},test:{rows // 4}}}",
        f"data.cardinalities=[{','.join([str(args.rows_per_table)] * 26)}]",
        "model=dlrm_kaggle", "mode=dense", "phases.pretrain_epochs=1", "trainer=torchrec",
        f"trainer.devices={args.ranks}", "loader.batch_size=512", "loader.eval_batch_size=1024",
        f"loader.cache_root={cache}", "logger.wandb=null", "latency.repeats=1",
        f"hydra.run.dir={out / 'run'}", *args.overrides,
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(args.code)}
    cmd = [sys.executable, str(args.code / "train.py"), *overrides]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=args.code, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    peaks: dict[int, float] = {}
    order: list[int] = []
    while proc.poll() is None:
        for pid in [proc.pid, *children(proc.pid)]:
            value = peak_rss_mib(pid)
            if value is not None:
                if pid not in peaks:
                    order.append(pid)
                peaks[pid] = max(value, peaks.get(pid, 0.0))
        time.sleep(0.1)
    if proc.returncode != 0:
        sys.exit(f"train.py failed ({proc.returncode}):\n{proc.stderr.read()[-3000:]}")
    # The launching process is rank 0; its children that live long enough to matter are the other ranks
    # (a data-loader or compile helper would be short-lived and small).
    ranks = [order[0]] + sorted((p for p in order[1:]), key=lambda p: -peaks[p])[: args.ranks - 1]
    summary = json.loads((out / "run" / "summary.json").read_text())
    table_bytes = 26 * args.rows_per_table * 16 * 4
    result = {"code": str(args.code), "ranks": args.ranks, "table_mib": round(table_bytes / 2**20, 1),
              "peak_rss_mib": [round(peaks[p], 1) for p in ranks],
              "shard_mib": [round(b / 2**20, 1) for b in summary["sharded_tables"]["pretrain"]["bytes_per_rank"]]}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
