"""Regenerates the sweep table of docs/admm_schedule.md from compression sweeps' summaries (never typed by hand).

    python bench/sweep_page.py --page docs/admm_schedule.md [--block sweep] [--key mode.method.admm.group_score] \
        "<data label>|<sweep dir>[,<sweep dir>...]" ...

One row per (data, budget, mode), aggregated over the seeds found below the sweep dir (every summary.json):
- forced: the share of the reduction the extraction forced, the largest over the run's compress stages
  (cascaded has two), mean and max over seeds (0 = ADMM met the budget itself);
- ΔAUC and Δlogloss of the test set against the equal-epochs dense model of the same seed
  (`delta_test_auc_same_epochs`, `delta_test_logloss_same_epochs`), mean ± sample std over seeds;
- met: seeds whose extracted model met the budget; collapsed: seeds flagged `quality_collapse`.
`--modes` keeps only the named modes. `--key` names run_config.json keys whose values label the mode (runs that
differ in them are separate rows).
Per (data, budget), the best mean ΔAUC is in bold. The page's `<!-- table:sweep -->` … `<!-- /table -->` block is
rewritten (atomically), the prose left alone; `--block NAME` rewrites `<!-- table:NAME -->` instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.pages import fill_block, mean_sd  # noqa: E402
from umec_lightning.io import write_text  # noqa: E402

MODE_ORDER = ["joint", "input_selection", "embedding_reduction", "cascaded", "taylor", "magnitude", "handcrafted",
              "lowrank_feature"]


def _delta(values: list[float]) -> str:
    return mean_sd(values, sign=True)


def _budget(summary: dict) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted((summary.get("budget") or {}).items()))


def _forced(summary: dict) -> float | None:
    shares = [st["forced_share_of_reduction"] for st in summary["stages"].values()
              if isinstance(st, dict) and "forced_share_of_reduction" in st]
    return max(shares) if shares else None


def _place(item) -> tuple:
    """Sort key of a ((budget, mode label), runs) item: by budget, then MODE_ORDER."""
    (budget, mode), _ = item
    order = {m: i for i, m in enumerate(MODE_ORDER)}
    return budget, order.get(mode.split()[0], 99), mode


def _label(summary: dict, config: dict, keys: list[str]) -> str:
    values = [f"{k.split('.')[-1]}={config[k]}" for k in keys if k in config]
    return f"{summary['mode']} ({', '.join(values)})" if values else summary["mode"]


def rows(specs: list[str], keys: list[str] = (), modes: set[str] | None = None) -> list[str]:
    head = ["| data | budget | mode | seeds | forced (mean / max) | ΔAUC vs dense | Δlogloss vs dense | met | "
            "collapsed |", "|---|---|---|---|---|---|---|---|---|"]
    out = []
    for spec in specs:
        label, root = spec.split("|")
        groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
        paths = sorted(p for part in root.split(",") for p in Path(part).rglob("summary.json"))
        for path in paths:
            s = json.loads(path.read_text())
            config_path = path.parent / "run_config.json"
            config = json.loads(config_path.read_text()) if config_path.exists() else {}
            if s.get("budget") and (modes is None or s["mode"] in modes):
                groups[(_budget(s), _label(s, config, list(keys)))].append(s)
        best: dict[str, float] = {}
        for (budget, _), runs in groups.items():
            deltas = [r["delta_test_auc_same_epochs"] for r in runs if "delta_test_auc_same_epochs" in r]
            if deltas:
                best[budget] = max(best.get(budget, -1.0), statistics.mean(deltas))
        for (budget, mode), runs in sorted(groups.items(), key=_place):
            forced = [f for f in map(_forced, runs) if f is not None]
            deltas = [r["delta_test_auc_same_epochs"] for r in runs if "delta_test_auc_same_epochs" in r]
            auc = _delta(deltas)
            if deltas and statistics.mean(deltas) == best.get(budget):
                auc = f"**{auc}**"
            logloss = _delta([r["delta_test_logloss_same_epochs"] for r in runs
                             if "delta_test_logloss_same_epochs" in r])
            forced_cell = f"{statistics.mean(forced):.3f} / {max(forced):.3f}" if forced else "–"
            out.append(f"| {label} | {budget} | {mode} | {','.join(str(r.get('seed')) for r in runs)} | "
                       f"{forced_cell} | {auc} | {logloss} | {sum(bool(r.get('budget_met')) for r in runs)}/"
                       f"{len(runs)} | {sum(bool(r.get('quality_collapse')) for r in runs)} |")
    return head + out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--page", type=Path, required=True)
    ap.add_argument("--block", default="sweep", help="the page's <!-- table:BLOCK --> to rewrite")
    ap.add_argument("--key", action="append", default=[], help="a run_config.json key that labels the mode")
    ap.add_argument("--modes", default=None, help="only these modes (comma-separated)")
    ap.add_argument("sweeps", nargs="+", help="data label|sweep dir[,sweep dir...]")
    args = ap.parse_args(argv)
    table = rows(args.sweeps, args.key, set(args.modes.split(",")) if args.modes else None)
    write_text(args.page, fill_block(args.page.read_text(), args.block, "\n".join(table)))


if __name__ == "__main__":
    main()
