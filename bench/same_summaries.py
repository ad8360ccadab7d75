"""Do two revisions compute the same thing? Runs the same modes with the same seed in a checkout of each and compares
their summary.json (every key but wall-clock times and paths) and their files byte for byte: the sparsity history,
kept.json, the per-row test predictions. What a refactor must leave unchanged.

    .venv/bin/python bench/same_summaries.py --before a2dd0ed --after HEAD
    .venv/bin/python bench/same_summaries.py --before HEAD~3 --after WORKTREE     # the working tree as it is

Each revision runs from a `git worktree` of its own (WORKTREE: this checkout), one thread, on the default synthetic
data limited to --rows training rows (val and test a sixth of that each), default modes dense, joint, magnitude,
lowrank_feature and cascaded (budget.flops=0.5 for the compressing ones). Exit status 1 when anything differs.
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
MODES = ["dense", "joint", "magnitude", "lowrank_feature", "cascaded"]
# Keys that differ between any two runs: wall-clock figures and paths.
VOLATILE = {"train_seconds", "samples_per_second", "latency_ms", "best_checkpoint", "compressed_path",
            "test_predictions", "dense_test_predictions", "peak_gpu_memory_mib", "pretrained", "exports"}
FILES = ["sparsity_history.json", "sparsity_history_select.json", "kept.json", "test_predictions_pretrain.npz",
         "test_predictions_finetune.npz"]


def checkout(rev: str, into: Path) -> Path:
    if rev == "WORKTREE":
        return ROOT
    path = into / rev.replace("/", "_").replace("~", "-")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-f", "--detach", str(path), rev], check=True,
                   capture_output=True)
    # The package installs `callbacks/` as `umec_lightning.callbacks` from this checkout; the other one must
    # import its own.
    (path / "umec_lightning" / "callbacks").symlink_to(path / "callbacks")
    return path


def run_modes(src: Path, out: Path, modes: list[str], rows: int, cache: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UMEC_CACHE": str(cache)}
    held = rows // 6
    for mode in modes:
        cmd = [sys.executable, "train.py", f"mode={mode}", *([] if mode == "dense" else ["budget.flops=0.5"]),
               "logger=csv", "trainer.enable_progress_bar=false", "latency.repeats=1", "latency.batches=[1]",
               f"loader.limit_rows={{train:{rows},val:{held},test:{held}}}", f"hydra.run.dir={out / mode}",
               "overwrite=true"]
        done = subprocess.run(cmd, cwd=src, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{src} mode={mode} failed:\n{done.stderr[-3000:]}")


def flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def compare(before: Path, after: Path, mode: str) -> list[str]:
    a = flat(json.loads((before / mode / "summary.json").read_text()))
    b = flat(json.loads((after / mode / "summary.json").read_text()))
    keys = sorted(k for k in set(a) | set(b) if not VOLATILE & set(k.split(".")))
    diffs = [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in keys
             if a.get(k, "<absent>") != b.get(k, "<absent>")]
    for name in FILES:
        x, y = before / mode / name, after / mode / name
        if x.exists() != y.exists() or (x.exists() and x.read_bytes() != y.read_bytes()):
            diffs.append(f"{name} differs")
    print(f"{mode}: {len(keys)} summary keys and {sum((before / mode / n).exists() for n in FILES)} files compared, "
          f"{len(diffs)} differ; test_auc {a.get('test_auc')} -> {b.get('test_auc')}")
    return diffs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True)
    p.add_argument("--after", default="WORKTREE")
    p.add_argument("--modes", nargs="+", default=MODES)
    p.add_argument("--rows", type=int, default=60000)
    p.add_argument("--keep", type=Path, help="keep the runs here (default: a temporary folder)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = args.keep or tmp / "runs"
        worktrees = []
        try:
            for side, rev in (("before", args.before), ("after", args.after)):
                src = checkout(rev, tmp)
                if src != ROOT:
                    worktrees.append(src)
                run_modes(src, runs / side, args.modes, args.rows, tmp / "cache")
            diffs = {mode: compare(runs / "before", runs / "after", mode) for mode in args.modes}
        finally:
            for path in worktrees:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
                               capture_output=True)
    for mode, lines in diffs.items():
        for line in lines[:20]:
            print(f"  {mode}: {line}")
    sys.exit(1 if any(diffs.values()) else 0)


if __name__ == "__main__":
    main()
