"""Reading the runs of a report: every summary.json below a directory, refusing what cannot be one table, and
every multirun member that failed (its failed.json, `umec_lightning/sweep.py`)."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import ReportError

DENSE_MODES = ("dense", "dense_control")
SUMMARY = "summary.json"
FAILED = "failed.json"  # what a failed multirun member writes (sweep.FAILED)
# Keys of run_config.json that vary between the seeds of one setting (or are the row's key already).
_SEED_KEYS = ("seed", "pretrained")
REF_LABELS = {
    "same_epochs": "equal-epochs dense (`dense_same_epochs_test_auc`)",
    "dense_control": "equal-epochs dense (`mode=dense_control` run, same data/model/seed)",
    "pretrained": "the run's pretrained dense model (`dense_test_auc`; no equal-epochs reference found)",
}
# With early stopping on, a control trains *at most* the run's epochs, until its validation stops improving.
REF_LABELS_EARLY_STOPPING = {
    "same_epochs": "dense under the same early stopping, at most as many epochs (`dense_same_epochs_test_auc`)",
    "dense_control": "dense under the same early stopping, at most as many epochs (`mode=dense_control` run, "
                     "same data/model/seed)",
}
REF_MARKS = {"same_epochs": "ˢ", "dense_control": "ᶜ", "pretrained": "ᵖ"}


# ---------------------------------------------------------------------------------------------- loading


@dataclass
class Run:
    path: Path  # the run dir (where summary.json is)
    summary: dict
    config: dict | None  # run_config.json (flat), when the run wrote one

    @property
    def mode(self) -> str:
        return self.summary["mode"]

    @property
    def seed(self):
        return self.summary.get("seed")

    @property
    def budget(self) -> tuple:
        return tuple(sorted((k, round(float(v), 6)) for k, v in (self.summary.get("budget") or {}).items()))

    @property
    def is_dense(self) -> bool:
        return self.mode in DENSE_MODES


def find_summaries(root: Path, name: str = SUMMARY) -> list[Path]:
    """Every file `name` (summary.json) below root (following symlinked run dirs, each real directory once),
    sorted."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        if name in filenames:
            found.append(Path(dirpath) / name)
    return sorted(found)


@dataclass
class Failure:
    """A multirun member that failed: its dir, its failed.json (None when unreadable: `problem` says why)."""

    path: Path
    record: dict | None
    problem: str | None = None
    has_summary: bool = False  # a summary.json beside it (an earlier run's, or written before the failure)

    @property
    def reason(self) -> str:
        """The error in one line (at most 300 characters)."""
        if self.record is None:
            return f"failed.json unreadable: {self.problem}"
        text = " ".join(str(self.record.get("error") or "no error recorded").split())
        return text if len(text) <= 300 else text[:299] + "…"

    @property
    def overrides(self) -> list[str]:
        record = self.record or {}
        return [str(o) for o in record.get("overrides") or record.get("swept") or []]


def load_failures(root: Path) -> list[Failure]:
    """Every failed.json below root: the members the table cannot hold."""
    failures = []
    for p in find_summaries(Path(root), FAILED):
        try:
            record, problem = json.loads(p.read_text()), None
            if not isinstance(record, dict):
                record, problem = None, f"not a JSON object ({type(record).__name__})"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            record, problem = None, str(err)
        failures.append(Failure(p.parent, record, problem, (p.parent / SUMMARY).exists()))
    return failures


def read_run(path: Path) -> Run:
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(f"cannot read {path}: {err}") from None
    if not isinstance(summary, dict):
        raise ReportError(f"cannot read {path}: not a run summary (a JSON object), got {type(summary).__name__}")
    missing = [k for k in ("mode", "data", "model", "seed", "test_auc") if k not in summary]
    if not missing and not (isinstance(summary["data"], dict) and "name" in summary["data"]):
        missing = ["data.name"]
    if missing:
        raise ReportError(f"cannot read {path}: not a run summary, missing key(s) {', '.join(missing)}")
    config = None
    cfg_path = path.parent / "run_config.json"
    if cfg_path.exists():
        try:
            config = json.loads(cfg_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ReportError(f"cannot read {cfg_path}: {err}") from None
    return Run(path=path.parent, summary=summary, config=config if isinstance(config, dict) else None)


def _counts(values) -> str:
    return ", ".join(f"{name} ({n} run{'s' if n != 1 else ''})" for name, n in sorted(Counter(values).items()))


def load_runs(root: Path, data: str | None = None, model: str | None = None) -> list[Run]:
    """The runs below root, all of one dataset and one model (else ReportError, naming what was found)."""
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"{root} is not a directory")
    failed = {p.parent for p in find_summaries(root, FAILED)}
    paths = [p for p in find_summaries(root) if p.parent not in failed]  # a failed member's summary is stale
    if not paths:
        failures = load_failures(root) if failed else []
        named = "; ".join(f"{f.path.name}: {f.reason}" for f in failures[:3]) + ("; …" if len(failures) > 3 else "")
        raise ReportError(f"no {SUMMARY} found below {root} (each `python train.py` run dir writes one)"
                          + (f"; {len(failures)} member(s) failed ({FAILED}): {named}" if failures else ""))
    runs = [read_run(p) for p in paths]
    for key, wanted in (("data", data), ("model", model)):
        if wanted is None:
            continue
        kept = [r for r in runs if _run_key(r, key) == wanted]
        if not kept:
            raise ReportError(f"no run below {root} has {key} {wanted!r}; found {key}: "
                              f"{_counts(_run_key(r, key) for r in runs)}")
        runs = kept
    mixed = [f"{key}: {_counts(_run_key(r, key) for r in runs)}" for key in ("data", "model")
             if len({_run_key(r, key) for r in runs}) > 1]
    if mixed:
        raise ReportError(f"the summaries below {root} mix datasets or models ({'; '.join(mixed)}): one "
                          "comparison is of one dataset and one model; select with --data NAME / --model NAME")
    return runs


def _run_key(run: Run, key: str) -> str:
    return str(run.summary["data"]["name"] if key == "data" else run.summary["model"])


