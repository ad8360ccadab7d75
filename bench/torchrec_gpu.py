"""trainer=torchrec against the replicated model (trainer=gpu) on one GPU: samples/s and peak memory.

For each batch size, three runs of train.py on the same synthetic data, one after another:
  gpu       mode=dense under trainer=gpu (the plain DLRM, tables as sparse-gradient nn.Embedding)
  torchrec  mode=dense under trainer=torchrec, 1 GPU, nccl (tables in fbgemm's fused TBE)
  joint     mode=joint budget.flops=0.5 under trainer=torchrec (pretrain, compress with ADMM, finetune)
Each stage trains `--steps` steps (`trainer.limit_train_batches`); the figures are the summary's
`samples_per_second` (training loop, data loading included) and `peak_gpu_memory_mib` of every stage.

    python bench/torchrec_gpu.py [--batches 2048 8192] [--steps 200] [--rows 1000000] [--out DIR]
    python bench/torchrec_gpu.py --cpu     # the same commands on CPU with dlrm_small: checks the script

Runs are sequential, not interleaved (each is a whole process): say so when quoting ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(name: str, overrides: list[str], out: Path, env: dict) -> dict:
    run_dir = out / name
    cmd = [sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}"]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"error": proc.returncode}
    return json.loads((run_dir / "summary.json").read_text())


def stage_figures(summary: dict) -> dict:
    """{stage: (samples/s, peak MiB)} of every stage that trained."""
    stages = {"pretrain": summary.get("pretrain", summary)} | summary.get("stages", {})
    return {name: (s.get("samples_per_second"), s.get("peak_gpu_memory_mib")) for name, s in stages.items()
            if isinstance(s, dict) and s.get("steps")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cpu", action="store_true", help="check the script on CPU (dlrm_small, tiny)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="torchrec_gpu_"))
    env = {**os.environ, "WANDB_MODE": "offline"}
    if args.cpu:
        model, accel, rows, gpu_trainer = "dlrm_small", "cpu", 20_000, ["trainer=cpu"]
    else:
        model, accel, rows, gpu_trainer = "dlrm_kaggle", "gpu", args.rows, ["trainer=gpu"]
    torchrec = ["trainer=torchrec", f"trainer.accelerator={accel}", "trainer.devices=1"]
    results = {}
    for batch in args.batches:
        common = [f"model={model}", "logger=csv", "trainer.enable_progress_bar=false",
                  f"data.rows={{train:{rows},val:{max(rows // 20, 4096)},test:{max(rows // 20, 4096)}}}",
                  f"loader.batch_size={batch}", "loader.eval_batch_size=16384",
                  f"trainer.limit_train_batches={args.steps}", "trainer.limit_val_batches=4",
                  "trainer.limit_test_batches=4", "latency.repeats=1", "latency.batches=[256]",
                  "phases.pretrain_epochs=1", "phases.compress_epochs=1", "phases.finetune_epochs=1"]
        runs = {"gpu": [*common, *gpu_trainer, "mode=dense"],
                "torchrec": [*common, *torchrec, "mode=dense"],
                "joint": [*common, *torchrec, "mode=joint", "budget.flops=0.5"]}
        for name, overrides in runs.items():
            summary = run(f"{name}-{batch}", overrides, out, env)
            results[f"{name} b{batch}"] = stage_figures(summary) if "error" not in summary else summary
    print(f"\n{args.steps} steps a stage, {model}, runs one after another (not interleaved); out: {out}\n")
    print("| run | stage | samples/s | peak MiB |\n|---|---|---|---|")
    for name, stages in results.items():
        if "error" in stages:
            print(f"| {name} | failed (exit {stages['error']}) | | |")
            continue
        for stage, (rate, peak) in stages.items():
            print(f"| {name} | {stage} | {rate} | {peak} |")
    (out / "torchrec_gpu.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
