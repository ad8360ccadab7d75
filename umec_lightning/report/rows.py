"""The table's rows: runs grouped by (mode, budget, setting), statistics over seeds, ΔAUC references (with what each
control really trained), significance on the test rows (significance.py), latency."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from .runs import _SEED_KEYS, DENSE_MODES, Run, _run_key
from .significance import PredictionStore, RowTest, mean_auc, versus_references

# ---------------------------------------------------------------------------------------------- statistics


@dataclass
class Stat:
    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        """Sample std (ddof=1); None with one value."""
        return statistics.stdev(self.values) if self.n > 1 else None

    def fmt(self, digits: int = 4, sign: bool = False) -> str:
        m = f"{self.mean:+.{digits}f}" if sign else f"{self.mean:.{digits}f}"
        return m if self.std is None else f"{m} ± {self.std:.{digits}f}"


def stat(values) -> Stat | None:
    vals = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)]
    return Stat(vals) if vals else None


def is_tie(delta: Stat) -> bool | None:
    """|mean| below the seed std of the per-seed differences; None (no call) with one seed."""
    if delta.std is None:
        return None
    return abs(delta.mean) < delta.std


# ---------------------------------------------------------------------------------------------- rows


class Reference(NamedTuple):
    """A run's ΔAUC reference: which kind, its test AUC and logloss, where its per-row test predictions are, and
    what it really trained: at most `epochs`, `epochs_run` of them, whether early stopping ended it (None: unknown)."""

    kind: str  # same_epochs | dense_control | pretrained
    auc: float
    logloss: float | None
    predictions: str | None = None
    run_dir: Path | None = None  # where a moved predictions file is looked for
    epochs: int | None = None  # the most it could train (T)
    epochs_run: int | None = None
    stopped_early: bool | None = None
    early_stopping: bool | None = None  # trained under an early-stopping rule


@dataclass
class Row:
    mode: str
    method: str | None
    budget: tuple
    variant: str  # "" or the config keys that set this row apart from the others of its (mode, budget)
    runs: list[Run]
    refs: list[Reference | None] = field(default_factory=list)  # per run
    auc_test: RowTest | None = None  # the seed-mean exact test AUC with its DeLong interval
    paired: RowTest | None = None  # the seed-mean exact ΔAUC vs the references, DeLong's contrast test
    store: PredictionStore | None = None  # the predictions files (shared by the rows of one report)

    @property
    def label(self) -> str:
        name = self.mode if not self.method or self.is_dense else f"{self.mode} ({self.method})"
        return f"{name} · {self.variant}" if self.variant else name

    @property
    def short_label(self) -> str:
        """For legends and titles: the mode and the variant's distinguishing keys, without the count of others."""
        variant = self.variant.split(" (+")[0]
        return f"{self.mode} · {variant}" if variant else self.mode

    @property
    def is_dense(self) -> bool:
        return self.mode in DENSE_MODES

    @property
    def budget_text(self) -> str:
        return ", ".join(f"{k}={v:g}" for k, v in self.budget) if self.budget else "–"

    def values(self, key: str) -> Stat | None:
        return stat(r.summary.get(key) for r in self.runs)

    @property
    def seeds(self) -> list:
        return sorted((r.seed for r in self.runs), key=str)

    @property
    def delta(self) -> Stat | None:
        return stat(r.summary["test_auc"] - ref[1] for r, ref in zip(self.runs, self.refs)
                    if ref is not None and isinstance(r.summary.get("test_auc"), (int, float)))

    @property
    def delta_logloss(self) -> Stat | None:
        """Test logloss minus the reference's, per run (lower is better), where both are known."""
        return stat(r.summary["test_logloss"] - ref[2] for r, ref in zip(self.runs, self.refs)
                    if ref is not None and ref[2] is not None
                    and isinstance(r.summary.get("test_logloss"), (int, float)))

    @property
    def ref_kinds(self) -> set[str]:
        return {ref[0] for ref in self.refs if ref is not None}


def _config_view(run: Run) -> dict:
    cfg = run.config or {}
    return {k: json.dumps(v, sort_keys=True) for k, v in cfg.items()
            if k not in _SEED_KEYS and not k.startswith("budget.")}


def _short_key(key: str) -> str:
    parts = key.split(".")
    for prefix in (["mode", "method", "admm"], ["mode", "method"], ["mode"]):
        if parts[:len(prefix)] == prefix and len(parts) > len(prefix):
            return ".".join(parts[len(prefix):])
    return key


def _distinguishing_keys(differing: list[str], views: list[dict]) -> list[str]:
    """A few of the differing config keys that together tell every variant apart (greedy: each step adds
    the key that separates the most; keys every run sets before keys older runs lack, then by name)."""
    variants = {tuple(v.get(k) for k in differing): v for v in views}.values()
    chosen: list[str] = []

    def distinct(keys):
        return len({tuple(v.get(k) for k in keys) for v in variants})

    while distinct(chosen) < len(variants):
        chosen.append(min((k for k in differing if k not in chosen),
                          key=lambda k: (-distinct([*chosen, k]), any(k not in v for v in variants), k)))
    return chosen


def _variant_label(naming: list[str], n_differing: int, view: dict) -> str:
    shown = [f"{_short_key(k)}={json.loads(view[k]) if k in view else '<unset>'}" for k in naming]
    more = n_differing - len(naming)
    return ", ".join(shown) + (f" (+{more} other differing key{'s' if more > 1 else ''})" if more > 0 else "")


def build_rows(runs: list[Run]) -> list[Row]:
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        groups[(r.mode, r.summary.get("method"), () if r.is_dense else r.budget)].append(r)
    rows = []
    for (mode, method, budget), members in groups.items():
        views = [_config_view(r) for r in members]
        keys = sorted(set().union(*views))
        differing = [k for k in keys if len({v.get(k) for v in views}) > 1]
        naming = _distinguishing_keys(differing, views)
        by_variant: dict[tuple, list[Run]] = defaultdict(list)
        labels = {}
        for r, v in zip(members, views):
            sig = tuple(v.get(k) for k in differing)
            by_variant[sig].append(r)
            labels[sig] = _variant_label(naming, len(differing), v) if differing else ""
        for sig, rs in by_variant.items():
            rows.append(Row(mode, method, budget, labels[sig], sorted(rs, key=lambda r: (str(r.seed), str(r.path)))))
    dense_first = {m: i for i, m in enumerate(DENSE_MODES)}
    rows.sort(key=lambda r: (0 if r.is_dense else 1, dense_first.get(r.mode, 0), r.budget, r.mode, r.variant))
    attach_references(rows, runs)
    attach_significance(rows)
    return rows


_PHASE_KEYS = ("phases.pretrain_epochs", "phases.compress_epochs", "phases.finetune_epochs")


def _match_control(run: Run, controls: list[Run]) -> Run | None:
    """The dense_control run of the same data, model and seed; ties broken by the same phase epochs (what
    `epochs: total` sums), then the same other `phases.*` settings (early stopping, lr decay: how the control
    trained), then the same budget (a sweep runs one control per budget), then the path."""
    same = [c for c in controls if c.seed == run.seed and _run_key(c, "data") == _run_key(run, "data")
            and _run_key(c, "model") == _run_key(run, "model")]
    if not same:
        return None

    def score(c: Run):
        mine, theirs = run.config or {}, c.config or {}
        epochs = all(k in mine and mine.get(k) == theirs.get(k) for k in _PHASE_KEYS)
        phases = all(mine.get(k) == theirs.get(k) for k in set(mine) | set(theirs)
                     if k.startswith("phases.") and k not in _PHASE_KEYS)
        budget = all(mine.get(k) == theirs.get(k) for k in set(mine) | set(theirs) if k.startswith("budget."))
        return (not epochs, not phases, not budget, str(c.path))

    return min(same, key=score)


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(value) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _flag(value) -> bool | None:
    return value if isinstance(value, bool) else None


def _early_stopping_on(run: Run) -> bool | None:
    """Whether the run's config had an early-stopping rule (None: no run_config.json, or older than the key)."""
    cfg = run.config or {}
    key = "phases.early_stopping.patience"
    return None if key not in cfg else cfg[key] is not None


def _total_epochs(run: Run) -> int | None:
    """The three phase epochs summed (what `mode=dense_control`'s `epochs: total` trains at most)."""
    cfg = run.config or {}
    values = [_int(cfg.get(k)) for k in _PHASE_KEYS]
    return None if None in values else sum(values)


def pretrain_epochs_run(run: Run) -> int | None:
    """Epochs behind the run's dense pretrain point: its own pretrain stage's, or from the shared reference the
    first `phases.pretrain_epochs` of its dense run (fewer where that run stopped early); None if unknown."""
    pretrain = run.summary.get("pretrain") or {}
    if _int(pretrain.get("epochs_run")) is not None:
        return pretrain["epochs_run"]
    planned = _int((run.config or {}).get("phases.pretrain_epochs"))
    if "dense_reference" in pretrain and planned is not None:
        stopped = _int(run.summary.get("dense_same_epochs_run"))
        return planned if stopped is None else min(planned, stopped)
    return None


def run_epochs(run: Run) -> int | None:
    """Epochs the run trained in all, from its summary (stages' `epochs_run`); None where a stage did not say."""
    if run.is_dense:
        return _int(run.summary.get("epochs_run"))
    stages = run.summary.get("stages")
    pretrain = pretrain_epochs_run(run)
    if not isinstance(stages, dict) or pretrain is None:
        return None
    counts = [_int(s.get("epochs_run")) if isinstance(s, dict) else None for s in stages.values()]
    return None if None in counts else pretrain + sum(counts)


def reference_of(run: Run, controls: list[Run]) -> Reference | None:
    """The run's ΔAUC reference, the first that exists: the shared reference's control in its summary; a
    `mode=dense_control` run (`_match_control`); its own pretrained dense model."""
    s = run.summary
    if run.mode == "dense_control":
        return None  # the reference itself
    if isinstance(s.get("dense_same_epochs_test_auc"), (int, float)):
        # The rule the control trained under, as its record says (older summaries: the run's own config).
        early = s["dense_same_epochs_early_stopping"] is not None if "dense_same_epochs_early_stopping" in s \
            else _early_stopping_on(run)
        return Reference("same_epochs", float(s["dense_same_epochs_test_auc"]),
                         _number(s.get("dense_same_epochs_test_logloss")), s.get("dense_same_epochs_test_predictions"),
                         None, _int(s.get("dense_same_epochs")), _int(s.get("dense_same_epochs_run")),
                         _flag(s.get("dense_same_epochs_stopped_early")), early)
    if (c := _match_control(run, controls)) is not None:
        return Reference("dense_control", float(c.summary["test_auc"]), _number(c.summary.get("test_logloss")),
                         c.summary.get("test_predictions"), c.path, _total_epochs(c), _int(c.summary.get("epochs_run")),
                         _flag(c.summary.get("stopped_early")), _early_stopping_on(c))
    if isinstance(s.get("dense_test_auc"), (int, float)):
        pretrain = s.get("pretrain") or {}
        return Reference("pretrained", float(s["dense_test_auc"]), _number(s.get("dense_test_logloss")),
                         s.get("dense_test_predictions"), run.path,
                         _int((run.config or {}).get("phases.pretrain_epochs")), pretrain_epochs_run(run),
                         _flag(pretrain.get("stopped_early")), _early_stopping_on(run))
    return None


def attach_references(rows: list[Row], runs: list[Run]) -> None:
    controls = [r for r in runs if r.mode == "dense_control"]
    for row in rows:
        row.refs = [reference_of(r, controls) for r in row.runs]


def attach_significance(rows: list[Row]) -> None:
    """Each row's DeLong interval of its seed-mean AUC and its paired test against its references."""
    store = PredictionStore()
    for row in rows:
        row.store = store
        row.auc_test = mean_auc(row.runs, store)
        row.paired = None if row.mode == "dense_control" else versus_references(row.runs, row.refs, store)


# ---------------------------------------------------------------------------------------------- latency


def latency_ratios(summary: dict) -> dict[int, float]:
    """Compressed/dense latency per batch size: the interleaved `ratio` block's median when present,
    else the ratio of the two medians."""
    lat = summary.get("latency_ms") or {}
    out = {}
    ratio = lat.get("ratio")
    if isinstance(ratio, dict):
        for key, v in ratio.items():
            v = v.get("median") if isinstance(v, dict) else v
            if isinstance(v, (int, float)):
                out[_batch(key)] = float(v)
    dense, comp = lat.get("dense") or {}, lat.get("compressed") or {}
    for key in set(dense) & set(comp):
        if _batch(key) not in out and isinstance(dense[key], (int, float)) and dense[key] > 0:
            out[_batch(key)] = float(comp[key]) / float(dense[key])
    return out


def _batch(key: str) -> int:
    return int(str(key).removeprefix("batch_"))


def row_latency(row: Row) -> dict[int, Stat]:
    per_batch = defaultdict(list)
    for r in row.runs:
        for b, v in latency_ratios(r.summary).items():
            per_batch[b].append(v)
    return {b: stat(v) for b, v in sorted(per_batch.items())}


