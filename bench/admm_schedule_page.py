"""Regenerates the table of docs/admm_schedule.md from compressed runs' summaries (never typed by hand).

    python bench/admm_schedule_page.py --page docs/admm_schedule.md "<data label>|<run dir glob>" ...

One row per run: data, mode, budget, the ADMM schedule and group score (run_config.json's
mode.method.admm.schedule, .group_score), seed, ADMM steps, what ADMM reached by itself
(`resource_after_admm` of the budgeted resources), the share of the reduction the extraction forced
(`forced_share_of_reduction`, 0 = ADMM met the budget itself; what it restored is not counted), validation
AUC of the extracted model before any finetune against the dense one.
The page's `<!-- table:admm -->` … `<!-- /table -->` block is rewritten (atomically), the prose left alone.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.pages import fill_block  # noqa: E402
from umec_lightning.io import write_text  # noqa: E402


def rows(specs: list[str]) -> list[str]:
    head = ["| data | mode | budget | schedule | group score | seed | ADMM steps | after ADMM | forced share "
            "| val AUC after extraction | dense val AUC |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    out = []
    for spec in specs:
        label, pattern = spec.split("|")
        for run in sorted(glob.glob(pattern)):
            path = Path(run)
            if not (path / "summary.json").exists():
                continue
            s = json.loads((path / "summary.json").read_text())
            config = json.loads((path / "run_config.json").read_text()) if (path / "run_config.json").exists() else {}
            schedule = config.get("mode.method.admm.schedule", "paper")
            # A short name (a CLI override), or the part's `_target_` (the YAML default): its class, lower case.
            score = config.get("mode.method.admm.group_score") \
                or config.get("mode.method.admm.group_score._target_", "–").rsplit(".", 1)[-1].lower()
            compress = [v for v in s["stages"].values() if "forced_share_of_reduction" in v]
            if not compress:
                continue
            last = compress[-1]
            budget = s.get("budget") or {}
            after = ", ".join(f"{k} {last['resource_after_admm'][k]:.3f}" for k in budget)
            out.append(f"| {label} | {s['mode']} | {', '.join(f'{k} {v:g}' for k, v in sorted(budget.items()))} | "
                       f"{schedule} | {score} | {s.get('seed')} | {last.get('admm_steps', '–')} | {after} | "
                       f"{last['forced_share_of_reduction']:.3f} | {s.get('val_auc', float('nan')):.4f} | "
                       f"{s.get('dense_val_auc', float('nan')):.4f} |")
    return head + sorted(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--page", type=Path, required=True)
    ap.add_argument("runs", nargs="+", help="data label|run-dir glob")
    args = ap.parse_args(argv)
    write_text(args.page, fill_block(args.page.read_text(), "admm", "\n".join(rows(args.runs))))


if __name__ == "__main__":
    main()
