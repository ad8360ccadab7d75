"""The table's rows: runs grouped by (mode, budget, setting), statistics over seeds, ΔAUC references, latency."""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from .runs import _SEED_KEYS, DENSE_MODES, Run, _run_key

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


@dataclass
class Row:
    mode: str
    method: str | None
    budget: tuple
    variant: str  # "" or the config keys that set this row apart from the others of its (mode, budget)
    runs: list[Run]
    # per run: (kind, reference test AUC, reference test logloss or None)
    refs: list[tuple[str, float, float | None] | None] = field(default_factory=list)

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
    return rows


_PHASE_KEYS = ("phases.pretrain_epochs", "phases.compress_epochs", "phases.finetune_epochs")


def _match_control(run: Run, controls: list[Run]) -> Run | None:
    """The dense_control run of the same data, model and seed; ties broken by the same phase epochs (what
    `epochs: total` sums), then the same budget (a sweep runs one control per budget), then the path."""
    same = [c for c in controls if c.seed == run.seed and _run_key(c, "data") == _run_key(run, "data")
            and _run_key(c, "model") == _run_key(run, "model")]
    if not same:
        return None

    def score(c: Run):
        mine, theirs = run.config or {}, c.config or {}
        epochs = all(k in mine and mine.get(k) == theirs.get(k) for k in _PHASE_KEYS)
        budget = all(mine.get(k) == theirs.get(k) for k in set(mine) | set(theirs) if k.startswith("budget."))
        return (not epochs, not budget, str(c.path))

    return min(same, key=score)


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def attach_references(rows: list[Row], runs: list[Run]) -> None:
    controls = [r for r in runs if r.mode == "dense_control"]
    for row in rows:
        row.refs = []
        for r in row.runs:
            ref = None
            if r.mode == "dense_control":
                ref = None  # the reference itself
            elif isinstance(r.summary.get("dense_same_epochs_test_auc"), (int, float)):
                ref = ("same_epochs", float(r.summary["dense_same_epochs_test_auc"]),
                       _number(r.summary.get("dense_same_epochs_test_logloss")))
            elif (c := _match_control(r, controls)) is not None:
                ref = ("dense_control", float(c.summary["test_auc"]), _number(c.summary.get("test_logloss")))
            elif isinstance(r.summary.get("dense_test_auc"), (int, float)):
                ref = ("pretrained", float(r.summary["dense_test_auc"]), _number(r.summary.get("dense_test_logloss")))
            row.refs.append(ref)


def reference_line(rows: list[Row], runs: list[Run]) -> tuple[str, Stat] | None:
    """The dense reference of the figures: the most-used ΔAUC reference kind, one value per seed."""
    kinds = Counter(ref[0] for row in rows for ref in row.refs if ref is not None)
    if not kinds:
        return None
    kind = kinds.most_common(1)[0][0]
    if kind == "dense_control":
        per_seed = {}
        for r in sorted((r for r in runs if r.mode == "dense_control"), key=lambda r: str(r.path)):
            per_seed.setdefault(r.seed, r.summary["test_auc"])
    else:
        per_seed = {}
        for row in rows:
            for r, ref in zip(row.runs, row.refs):
                if ref is not None and ref[0] == kind:
                    per_seed.setdefault(r.seed, ref[1])
    s = stat(per_seed.values())
    return (kind, s) if s else None


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


