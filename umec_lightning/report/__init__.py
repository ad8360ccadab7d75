"""The comparison report: every `summary.json` below a directory, one table and the paper's figures.

    python -m umec_lightning.report <dir> [--out <dir>] [--data NAME] [--model NAME] [--wandb]
    umec-report <dir> ...                      (the same, as the installed console script)

Writes, atomically, into `--out` (default `<dir>`):

* `report.md`: one row per (mode/method, budget), aggregated over seeds: the measured flops and params
  ratios of the extracted model, test AUC and logloss as mean ± sample std (n), ΔAUC against the
  equal-epochs dense model, the latency ratio (compressed/dense) per timed batch size and how many seeds
  met the budget, then from the runs' per-row test predictions the exact seed-mean AUC with its DeLong 95 %
  interval and the seed-mean ΔAUC with DeLong's paired test on the same test rows, and the epochs the row's
  runs and their controls really trained; under it, per budget, the method with the best mean test AUC and
  whether it is ahead of the next; last, every multirun member that failed (its `failed.json`: the one-line
  reason and its overrides; a summary.json beside a failed.json is an earlier run's and is left out).
* `auc_vs_ratio.png` (paper Fig. 2/4), `kept_groups.png` (Fig. 6, from each method's representative
  `sparsity_history.json`) and, when both modes are present, `joint_vs_cascaded.png` (Fig. 8).

ΔAUC reference, per run, the first that exists: the summary's `dense_same_epochs_test_auc`; the test AUC of a
`mode=dense_control` run below `<dir>` with the same data, model and seed (preferring one trained with the
same phase epochs, then the same early stopping); the run's own pretrained dense model (`dense_test_auc`, not
equal-epochs: the table header says so). With early stopping on, the controls trained under the same rule for at
most the run's epochs (reference.py) and the header says so; the `epochs run` column says what they trained.

Significance (significance.py, delong.py): the seeds of a row are scored on the same test rows as their controls
(the test split does not depend on `seed` here; predictions files are checked to hold the same rows: data
fingerprint, row count and labels). Over seeds, the quantity tested is the seed-mean ΔAUC, a contrast of all the
runs' and controls' AUCs whose DeLong variance uses their covariance over the shared rows (one seed: DeLong's
paired test). Tie rule: a ΔAUC (and the best method's lead over the next) is a tie when its |mean| is below the
seed std of the per-seed differences (training noise, n >= 2) *or* the paired test on the test rows gives
p >= 0.05 (test-row noise); with neither available there is no tie call. The exact AUCs of these columns differ
from the summaries' binned `test_auc` in about the fifth decimal.

Runs of one (mode, budget) that differ in anything besides the seed (their `run_config.json`) are separate
rows, labelled with the keys that differ, so different settings are never averaged as if they were seeds.
Refused, in one line (exit 2): no summary.json below `<dir>`, an unreadable summary (named), summaries of
more than one dataset or model (named, with counts; `--data`/`--model` select one).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..errors import ReportError
from ..io import write_text
from .figures import build_figures
from .markdown import COLUMNS, render_markdown, row_cells
from .rows import Row, build_rows
from .runs import load_failures, load_runs

# ---------------------------------------------------------------------------------------------- wandb


def log_wandb(rows: list[Row], figures: list[Path], out: Path, root: Path) -> Path:
    """The table as a wandb.Table and the figures as wandb.Image, in an offline run (WANDB_MODE) under out."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    mixed = len(set().union(*(row.ref_kinds for row in rows))) > 1
    # The mode passed, not only set in the environment: wandb reads the environment once per process, and an
    # earlier run of this process (a training run's logger) fixes its settings.
    run = wandb.init(project="umec-report", job_type="report", dir=str(out), name=f"report-{root.name}",
                     config={"root": str(root)}, mode=os.environ["WANDB_MODE"])
    try:
        table = wandb.Table(columns=COLUMNS, data=[row_cells(row, mixed) for row in rows])
        run.log({"comparison": table, **{f"figures/{p.stem}": wandb.Image(str(p)) for p in figures}})
        run_dir = Path(run.dir).parent
    finally:
        run.finish()
    return run_dir


# ---------------------------------------------------------------------------------------------- entry


def build_report(root: Path, out: Path | None = None, data: str | None = None, model: str | None = None,
                 wandb: bool = False) -> dict:
    """Reads the runs below root and writes report.md and the figures into out (default root)."""
    root = Path(root)
    out = Path(out) if out is not None else root
    runs = load_runs(root, data=data, model=model)
    failures = load_failures(root)
    rows = build_rows(runs)
    out.mkdir(parents=True, exist_ok=True)
    figures = build_figures(rows, runs, out)
    report = write_text(out / "report.md", render_markdown(root, runs, rows, figures, failures))
    result = {"report": report, "figures": figures, "rows": rows, "failures": failures}
    if wandb:
        result["wandb_dir"] = log_wandb(rows, figures, out, root)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="umec-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="directory searched recursively for run summaries (summary.json)")
    parser.add_argument("--out", type=Path, default=None, help="where report.md and the PNGs go (default: dir)")
    parser.add_argument("--data", default=None, help="only the runs of this dataset (summary data.name)")
    parser.add_argument("--model", default=None, help="only the runs of this model (summary model)")
    parser.add_argument("--wandb", action="store_true", default=os.environ.get("UMEC_REPORT_WANDB") == "1",
                        help="also log the table and figures to an offline W&B run (or UMEC_REPORT_WANDB=1)")
    args = parser.parse_args(argv)
    try:
        result = build_report(args.dir, args.out, data=args.data, model=args.model, wandb=args.wandb)
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    failed = f"; {len(result['failures'])} failed member(s) listed" if result["failures"] else ""
    print(f"wrote {result['report']} ({len(result['rows'])} rows{failed})")
    for p in result["figures"]:
        print(f"wrote {p}")
    if "wandb_dir" in result:
        print(f"wandb run: {result['wandb_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
