"""Regenerates the result tables of docs/regularization.md from run summaries (never typed by hand).

    python bench/regularization_page.py --page docs/regularization.md \
        --fuxictr results.jsonl \
        --dense "frappe_like|bars|experiment=frappe|<run dir glob>" ... \
        --sweep "frappe_like|experiment=frappe|<sweep dir>" ...

The page holds blocks `<!-- table:dense -->` … `<!-- /table -->` and `<!-- table:compression -->` … ; this
rewrites what is between the markers (atomically) and leaves the prose alone.

dense rows: FuxiCTR's runs (bench/vs_fuxictr.py's results.jsonl: dataset, config, seed, test_auc,
test_logloss, epochs_run, wall_s) beside ours (dense runs' summaries), matched by `<data>|<config>`: one row
per library and config, mean ± std over seeds. Our seconds are the run's `train_seconds` (the fit alone);
FuxiCTR's are build + fit + evaluation.
compression rows: per sweep (a `python train.py -m` dir of dense_control and compressed members), each
compressed mode against the dense_control member of the same seed: params ratio, test AUC, ΔAUC, test
logloss, Δlogloss, mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.pages import fill_block, mean_sd  # noqa: E402
from umec_lightning.io import write_text  # noqa: E402


def _summaries(pattern: str) -> list[dict]:
    out = []
    for path in glob.glob(os.path.join(pattern, "summary.json")):
        out.append(json.loads(Path(path).read_text()))
    return sorted(out, key=lambda s: s.get("seed", 0))


def dense_table(fuxictr: list[dict], specs: list[str]) -> str:
    lines = ["| data | settings | library | seeds | test AUC | test logloss | epochs | seconds per run |",
             "|---|---|---|---|---|---|---|---|"]
    for spec in specs:
        data, config, label, pattern = spec.split("|")
        theirs = [r for r in fuxictr if Path(r["data"]).name == data and r["config"] == config]
        ours = _summaries(pattern)
        if theirs:
            lines.append(f"| {data} | {config} | FuxiCTR 2.3.10 | {','.join(str(r['seed']) for r in theirs)} | "
                         f"{mean_sd([r['test_auc'] for r in theirs])} | "
                         f"{mean_sd([r['test_logloss'] for r in theirs])} | "
                         f"{mean_sd([r['epochs_run'] for r in theirs], 1)} | "
                         f"{mean_sd([r['wall_s'] for r in theirs], 1)} |")
        if ours:
            lines.append(f"| {data} | {config} | ours, `{label}` | {','.join(str(s.get('seed')) for s in ours)} | "
                         f"{mean_sd([s['test_auc'] for s in ours])} | {mean_sd([s['test_logloss'] for s in ours])} | "
                         f"{mean_sd([s['epochs_run'] for s in ours], 1)} | "
                         f"{mean_sd([s['train_seconds'] for s in ours], 1)} |")
    return "\n".join(lines)


def compression_table(specs: list[str]) -> str:
    lines = ["| data | settings | method | seeds | params ratio | test AUC | ΔAUC vs dense | test logloss | "
             "Δlogloss vs dense |", "|---|---|---|---|---|---|---|---|---|"]
    for spec in specs:
        data, label, root = spec.split("|")
        runs = [json.loads(p.read_text()) for p in sorted(Path(root).glob("*/summary.json"))]
        dense = {r["seed"]: r for r in runs if r["mode"] == "dense_control"}
        modes = sorted({r["mode"] for r in runs}, key=lambda m: (m != "dense_control", m))
        for mode in modes:
            members = sorted((r for r in runs if r["mode"] == mode and r["seed"] in dense), key=lambda r: r["seed"])
            if not members:
                continue
            d_auc = [r["test_auc"] - dense[r["seed"]]["test_auc"] for r in members]
            d_ll = [r["test_logloss"] - dense[r["seed"]]["test_logloss"] for r in members]
            ratio = "1" if mode == "dense_control" else mean_sd([r["params_ratio"] for r in members], 3)
            lines.append(f"| {data} | `{label}` | {mode} | {','.join(str(r['seed']) for r in members)} | {ratio} | "
                         f"{mean_sd([r['test_auc'] for r in members])} | "
                         f"{'reference' if mode == 'dense_control' else mean_sd(d_auc, 4, sign=True)} | "
                         f"{mean_sd([r['test_logloss'] for r in members])} | "
                         f"{'reference' if mode == 'dense_control' else mean_sd(d_ll, 4, sign=True)} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--page", type=Path, required=True)
    ap.add_argument("--fuxictr", type=Path, help="bench/vs_fuxictr.py's results.jsonl")
    ap.add_argument("--dense", action="append", default=[], help="data|config|our command|run-dir glob")
    ap.add_argument("--sweep", action="append", default=[], help="data|our command|sweep dir")
    args = ap.parse_args(argv)
    fuxictr = [json.loads(line) for line in args.fuxictr.read_text().splitlines() if line.strip()] \
        if args.fuxictr else []
    page = args.page.read_text()
    page = fill_block(page, "dense", dense_table(fuxictr, args.dense))
    page = fill_block(page, "compression", compression_table(args.sweep))
    write_text(args.page, page)


if __name__ == "__main__":
    main()
