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
import statistics
import tempfile
from pathlib import Path


def _stat(values: list[float], digits: int = 4, sign: bool = False) -> str:
    if not values:
        return "–"
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:+.{digits}f} ± {sd:.{digits}f}" if sign else f"{mean:.{digits}f} ± {sd:.{digits}f}"


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
                         f"{_stat([r['test_auc'] for r in theirs])} | {_stat([r['test_logloss'] for r in theirs])} | "
                         f"{_stat([r['epochs_run'] for r in theirs], 1)} | {_stat([r['wall_s'] for r in theirs], 1)} |")
        if ours:
            lines.append(f"| {data} | {config} | ours, `{label}` | {','.join(str(s.get('seed')) for s in ours)} | "
                         f"{_stat([s['test_auc'] for s in ours])} | {_stat([s['test_logloss'] for s in ours])} | "
                         f"{_stat([s['epochs_run'] for s in ours], 1)} | "
                         f"{_stat([s['train_seconds'] for s in ours], 1)} |")
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
            ratio = "1" if mode == "dense_control" else _stat([r["params_ratio"] for r in members], 3)
            lines.append(f"| {data} | `{label}` | {mode} | {','.join(str(r['seed']) for r in members)} | {ratio} | "
                         f"{_stat([r['test_auc'] for r in members])} | "
                         f"{'reference' if mode == 'dense_control' else _stat(d_auc, 4, sign=True)} | "
                         f"{_stat([r['test_logloss'] for r in members])} | "
                         f"{'reference' if mode == 'dense_control' else _stat(d_ll, 4, sign=True)} |")
    return "\n".join(lines)


def fill(page: str, name: str, table: str) -> str:
    start, end = f"<!-- table:{name} -->", "<!-- /table -->"
    head, sep, rest = page.partition(start)
    if not sep:
        raise SystemExit(f"the page has no {start} block")
    _, sep2, tail = rest.partition(end)
    if not sep2:
        raise SystemExit(f"the {start} block is not closed by {end}")
    return f"{head}{start}\n{table}\n{end}{tail}"


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
    page = fill(page, "dense", dense_table(fuxictr, args.dense))
    page = fill(page, "compression", compression_table(args.sweep))
    fd, tmp = tempfile.mkstemp(dir=args.page.parent, prefix=".page.")
    with os.fdopen(fd, "w") as f:
        f.write(page)
    os.replace(tmp, args.page)


if __name__ == "__main__":
    main()
