"""FuxiCTR's DLRM as an outside baseline: runs it in ITS OWN venv (never imported here) and tabulates.

    python bench/vs_fuxictr.py --fuxictr-python /work/fuxi/.venv/bin/python --runner bench/fuxictr/runner.py \
        --data /work/fuxi/data/frappe_like_s0 --dataset frappe [--configs bars ours] [--seeds 0 1 2] \
        [--epochs 100] [--out results.jsonl] [--table results.md]
    python bench/vs_fuxictr.py --summarize results.jsonl          # only the mean ± std table
    FUXICTR_DCNV2=<dir with DCNv2.py> python bench/vs_fuxictr.py ... --dataset criteo --configs ours --model DCNv2

Each (config, seed) is one subprocess of the runner, one at a time, with OMP_NUM_THREADS=1 (the runner also
calls torch.set_num_threads(1)); the runner appends one JSON line per run (test AUC / logloss, val AUC,
epochs run, wall seconds, the settings) to --out, and this file prints the table over seeds.

Set-up used for the recorded numbers (CPU only, Python 3.11):
    python3 -m venv /work/fuxi/.venv
    /work/fuxi/.venv/bin/pip install torch==2.13.0                        # the CPU wheel; keep the pin
    /work/fuxi/.venv/bin/pip install fuxictr==2.3.10 'polars<2' torch==2.13.0
The runner (bench/fuxictr/runner.py; FUXICTR_DLRM=<a folder holding FuxiCTR's Apache-2.0
model_zoo/DLRM/src/DLRM.py from github.com/reczoo/FuxiCTR, commit 0245987, not in this repository: the pip
package ships no model zoo) builds FuxiCTR's
feature map with its FeatureProcessor (vocabulary on train, min count 1, unseen -> its OOV id), loads the
splits with its NpzDataLoader and trains with BaseModel.fit: Adam lr 1e-3, validation AUC each epoch, lr x0.1
on each non-improving epoch, stop after 2 of them, best-AUC weights reloaded before the test evaluation.
Two deviations from run_expid.py: Ray (2.3.10's build_dataset / ParquetDataLoader) is bypassed, and numeric
inputs are reshaped to (B, 1) float before the model (the model_zoo DLRM concatenates (B,) columns otherwise).
Configs ("bars": the tuned BARS DLRM logs, reczoo/BARS ranking/ctr/DLRM/DLRM_{frappe,criteo}_x1; "ours": no
dropout / BN / regularizer) are listed in the runner's CONFIGS.
Data: Frappe-like = `python bench/frappe_like.py --out DIR --seed 0`; Criteo sample (bench/fuxictr/criteo_csv.py)
= the 10k-line Kaggle head split like umec_lightning.data.criteo (7 line-order days, train = 6, last day
halved test | val), dense log(1 + max(x, 0)), categorical hex -> decimal string, empty -> "0", written as
train/valid/test.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
from pathlib import Path

METRICS = ("test_auc", "test_logloss", "val_auc", "epochs_run", "wall_s")


def table(records: list[dict]) -> str:
    """Markdown table, one row per (dataset, data, config): mean ± std over the seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["dataset"], Path(r["data"]).name, f'{r.get("model", "DLRM")} {r["config"]}'),
                          []).append(r)
    lines = ["| dataset | data | config | seeds | " + " | ".join(METRICS) + " |", "|" + "---|" * (4 + len(METRICS))]
    for (ds, data, cfg), rs in sorted(groups.items()):
        cells = []
        for m in METRICS:
            v = [float(r[m]) for r in rs]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.mean(v):.4f} ± {sd:.4f}" if "auc" in m or "logloss" in m
                         else f"{statistics.mean(v):.1f} ± {sd:.1f}")
        lines.append(f"| {ds} | {data} | {cfg} | {','.join(str(r['seed']) for r in rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fuxictr-python", type=Path, help="python of the venv that has fuxictr==2.3.10")
    ap.add_argument("--runner", type=Path, default=Path(__file__).resolve().parent / "fuxictr" / "runner.py")
    ap.add_argument("--data", type=Path, help="directory with train.csv, valid.csv, test.csv")
    ap.add_argument("--dataset", choices=["criteo", "frappe"])
    ap.add_argument("--configs", nargs="+", default=["bars", "ours"])
    ap.add_argument("--model", choices=["DLRM", "DCNv2", "DeepFM"], default="DLRM",
                    help="which model_zoo model the runner trains (DCNv2 and DeepFM: --configs ours)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--out", type=Path, default=Path("fuxictr_results.jsonl"))
    ap.add_argument("--table", type=Path, help="also write the markdown table here")
    ap.add_argument("--summarize", type=Path, help="only print the table of this JSON-lines file")
    args = ap.parse_args(argv)
    if args.summarize is None:
        if not (args.fuxictr_python and args.data and args.dataset):
            ap.error("--fuxictr-python, --data and --dataset are required to run")
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        for cfg in args.configs:
            for seed in args.seeds:
                cmd = [str(args.fuxictr_python), str(args.runner), "--data", str(args.data), "--dataset",
                       args.dataset, "--config", cfg, "--seed", str(seed), "--epochs", str(args.epochs),
                       "--model", args.model, "--out", str(args.out)]
                print("+", " ".join(cmd), flush=True)
                subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (args.summarize or args.out).read_text().splitlines() if line.strip()]
    text = table(records)
    print(text)
    if args.table:
        args.table.write_text(text + "\n")


if __name__ == "__main__":
    main()
