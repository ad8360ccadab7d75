"""The comparison report: every `summary.json` below a directory, one table and the paper's figures.

    python -m umec_lightning.report <dir> [--out <dir>] [--data NAME] [--model NAME] [--wandb]
    umec-report <dir> ...                      (the same, as the installed console script)

Writes, atomically, into `--out` (default `<dir>`):

* `report.md`: one row per (mode/method, budget), aggregated over seeds: the measured flops and params
  ratios of the extracted model, test AUC and logloss as mean ± sample std (n), ΔAUC against the
  equal-epochs dense model, the latency ratio (compressed/dense) per timed batch size and how many seeds
  met the budget; under it, per budget, the method with the best mean test AUC.
* `auc_vs_ratio.png` (paper Fig. 2/4), `kept_groups.png` (Fig. 6, from each method's representative
  `sparsity_history.json`) and, when both modes are present, `joint_vs_cascaded.png` (Fig. 8).

ΔAUC reference, per run, the first that exists: the summary's `dense_same_epochs_test_auc`; the test AUC of a
`mode=dense_control` run below `<dir>` with the same data, model and seed (preferring one trained with the
same phase epochs); the run's own pretrained dense model (`dense_test_auc`, not equal-epochs: the table
header says so). A ΔAUC whose |mean| is below the sample std over seeds of the per-seed differences is a
tie; with one seed there is no std and no tie call.

Runs of one (mode, budget) that differ in anything besides the seed (their `run_config.json`) are separate
rows, labelled with the keys that differ, so different settings are never averaged as if they were seeds.
Refused, in one line (exit 2): no summary.json below `<dir>`, an unreadable summary (named), summaries of
more than one dataset or model (named, with counts; `--data`/`--model` select one).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import statistics
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ReportError
from .io import write_bytes, write_text

DENSE_MODES = ("dense", "dense_control")
SUMMARY = "summary.json"
# Keys of run_config.json that vary between the seeds of one setting (or are the row's key already).
_SEED_KEYS = ("seed", "pretrained")
REF_LABELS = {
    "same_epochs": "equal-epochs dense (`dense_same_epochs_test_auc`)",
    "dense_control": "equal-epochs dense (`mode=dense_control` run, same data/model/seed)",
    "pretrained": "the run's pretrained dense model (`dense_test_auc`; no equal-epochs reference found)",
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


def find_summaries(root: Path) -> list[Path]:
    """Every summary.json below root (following symlinked run dirs, each real directory once), sorted."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        if SUMMARY in filenames:
            found.append(Path(dirpath) / SUMMARY)
    return sorted(found)


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
    paths = find_summaries(root)
    if not paths:
        raise ReportError(f"no {SUMMARY} found below {root} (each `python train.py` run dir writes one)")
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
    refs: list[tuple[str, float] | None] = field(default_factory=list)  # per run: (kind, reference test AUC)

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


def attach_references(rows: list[Row], runs: list[Run]) -> None:
    controls = [r for r in runs if r.mode == "dense_control"]
    for row in rows:
        row.refs = []
        for r in row.runs:
            ref = None
            if r.mode == "dense_control":
                ref = None  # the reference itself
            elif isinstance(r.summary.get("dense_same_epochs_test_auc"), (int, float)):
                ref = ("same_epochs", float(r.summary["dense_same_epochs_test_auc"]))
            elif (c := _match_control(r, controls)) is not None:
                ref = ("dense_control", float(c.summary["test_auc"]))
            elif isinstance(r.summary.get("dense_test_auc"), (int, float)):
                ref = ("pretrained", float(r.summary["dense_test_auc"]))
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


# ---------------------------------------------------------------------------------------------- markdown

COLUMNS = ["method", "budget", "n", "seeds", "flops ratio", "params ratio", "test AUC", "test logloss", "ΔAUC",
           "latency ratio", "budget met"]


def _cell(s: Stat | None, digits: int = 4, sign: bool = False) -> str:
    return "–" if s is None else s.fmt(digits, sign)


def delta_cell(row: Row, mark: bool) -> str:
    if row.mode == "dense_control":
        return "reference"
    d = row.delta
    if d is None:
        return "–"
    text = d.fmt(4, sign=True)
    tie = is_tie(d)
    text += " (tie)" if tie else "" if tie is not None else " (n=1: no tie call)"
    if mark:
        text += "".join(REF_MARKS[k] for k in sorted(row.ref_kinds))
    return text


def budget_met_cell(row: Row) -> str:
    met = [r.summary.get("budget_met") for r in row.runs]
    known = [m for m in met if m is not None]
    return f"{sum(1 for m in known if m)}/{len(row.runs)}" if known else "–"


def row_cells(row: Row, mark: bool) -> list[str]:
    lat = row_latency(row)
    return [
        row.label,
        row.budget_text,
        str(len(row.runs)),
        ",".join(str(s) for s in row.seeds),
        "1" if row.is_dense else _cell(row.values("flops_ratio"), 3),
        "1" if row.is_dense else _cell(row.values("params_ratio"), 3),
        _cell(row.values("test_auc")),
        _cell(row.values("test_logloss")),
        delta_cell(row, mark),
        " · ".join(f"b{b}: {s.fmt(2)}" for b, s in lat.items()) if lat else "–",
        budget_met_cell(row),
    ]


def best_per_budget(rows: list[Row]) -> list[str]:
    """Per budget: the method with the best mean test AUC, and how far ahead of the next one."""
    lines = []
    by_budget = defaultdict(list)
    for row in rows:
        if not row.is_dense and row.budget and row.values("test_auc"):
            by_budget[row.budget].append(row)
    for budget in sorted(by_budget):
        ranked = sorted(by_budget[budget], key=lambda r: -r.values("test_auc").mean)
        best, auc = ranked[0], ranked[0].values("test_auc")
        line = f"- **{ranked[0].budget_text}**: {best.label}, test AUC {auc.fmt()} (n={auc.n})"
        if len(ranked) > 1:
            nxt, nauc = ranked[1], ranked[1].values("test_auc")
            gap = auc.mean - nauc.mean
            stds = [s for s in (auc.std, nauc.std) if s is not None]
            verdict = ("" if not stds else " — a tie (the gap is below the seed std)" if gap < max(stds)
                       else " — ahead by more than the seed std")
            line += f"; next {nxt.label} {nauc.fmt()} (n={nauc.n}), gap {gap:.4f}{verdict}"
        else:
            line += " (the only method at this budget)"
        lines.append(line)
    return lines


def render_markdown(root: Path, runs: list[Run], rows: list[Row], figures: list[Path]) -> str:
    kinds = sorted(set().union(*(row.ref_kinds for row in rows)))
    mixed = len(kinds) > 1
    columns = list(COLUMNS)
    if len(kinds) == 1:
        columns[8] = f"ΔAUC vs {REF_LABELS[kinds[0]]}"
    elif mixed:
        columns[8] = "ΔAUC vs dense (reference marked per cell)"
    data, model = _run_key(runs[0], "data"), _run_key(runs[0], "model")
    out = [
        "# Comparison report",
        "",
        f"{len(runs)} runs below `{root}`; data `{data}`, model `{model}`. One row per (mode/method, budget), "
        "aggregated over seeds: mean ± sample std (ddof=1) over n seeds. Ratios are measured on the extracted "
        "model (compressed/dense); latency ratio is compressed/dense per batch size (bN). A ΔAUC whose |mean| is "
        "below the seed std of the per-seed differences is marked (tie).",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row_cells(row, mixed)) + " |" for row in rows]
    if mixed:
        out += ["", "ΔAUC references: " + "; ".join(f"{REF_MARKS[k]} {REF_LABELS[k]}" for k in kinds) + "."]
    dup = [f"{row.label} ({row.budget_text}): seed {s}" for row in rows
           for s, n in Counter(map(str, row.seeds)).items() if n > 1]
    if dup:
        out += ["", "Note: the same seed appears more than once (identical config) in: " + "; ".join(dup) + "."]
    best = best_per_budget(rows)
    if best:
        out += ["", "## Best mean test AUC per budget", "", *best]
    if figures:
        out += ["", "## Figures", "", *[f"![{p.stem}]({p.name})" for p in figures]]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    _plt().close(fig)
    return write_bytes(path, buf.getvalue())


def _ref_text(kind: str) -> str:
    return {"same_epochs": "dense, equal epochs", "dense_control": "dense_control (equal epochs)",
            "pretrained": "pretrained dense"}[kind]


def _draw_reference(ax, ref) -> None:
    if ref is None:
        return
    kind, s = ref
    std = s.std or 0.0
    ax.axhline(s.mean, color="black", linestyle="--", linewidth=1.2,
               label=f"{_ref_text(kind)}: {s.fmt()} (n={s.n})")
    if std:
        ax.axhspan(s.mean - std, s.mean + std, color="grey", alpha=0.2, linewidth=0)


def _resources(rows: list[Row]) -> list[str]:
    used = sorted({k for row in rows for k, _ in row.budget})
    return used or ["flops"]


def plot_auc_vs_ratio(rows: list[Row], ref, path: Path, title: str, modes: tuple[str, ...] | None = None) -> Path:
    """Test AUC vs the measured ratio of the budgeted resource, one series per method (paper Fig. 2/4)."""
    plt = _plt()
    comp = [r for r in rows if not r.is_dense and (modes is None or r.mode in modes) and r.values("test_auc")]
    # Fig. 8 compares at the budgets the cascaded runs used; Fig. 2/4 at every budgeted resource.
    resources = _resources([r for r in comp if r.mode == modes[-1]] if modes else comp)
    fig, axes = plt.subplots(len(resources), 1, figsize=(9, 5 * len(resources)), squeeze=False)
    series = sorted({r.short_label for r in comp})
    cmap = plt.get_cmap("tab10" if len(series) <= 10 else "tab20")
    markers = "osD^vP*Xh<>p"
    style = {name: (cmap(i % cmap.N), markers[i % len(markers)]) for i, name in enumerate(series)}
    for ax, res in zip(axes[:, 0], resources):
        for name in series:
            pts = [r for r in comp if r.short_label == name and (not r.budget or res in dict(r.budget))]
            pts = [(r.values(f"{res}_ratio"), r.values("test_auc")) for r in pts]
            pts = sorted(((x, y) for x, y in pts if x is not None), key=lambda p: p[0].mean)
            if not pts:
                continue
            color, marker = style[name]
            ax.errorbar([x.mean for x, _ in pts], [y.mean for _, y in pts],
                        xerr=[x.std or 0 for x, _ in pts], yerr=[y.std or 0 for _, y in pts],
                        color=color, marker=marker, capsize=3, linewidth=1.2, markersize=6,
                        label=f"{name} (n={'/'.join(str(y.n) for _, y in pts)})")
        _draw_reference(ax, ref)
        ax.set_xlabel(f"measured {res} ratio (compressed / dense)")
        ax.set_ylabel("test AUC (mean ± std over seeds)")
        ax.set_title(f"{title}: budget on {res}")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return _save(fig, path)


FEATURE_MODES = ("input_selection", "group_lasso")  # the paper's Fig. 4: what each keeps of the inputs


def _features_kept(run: Run) -> int | None:
    features = (run.summary.get("kept") or {}).get("features")
    return None if features is None else len([f for f in features if f != "dense"])


def plot_auc_vs_features(rows: list[Row], ref, path: Path, title: str) -> Path:
    """Test AUC vs the number of input features kept, input selection against group lasso (paper Fig. 4);
    a point per row (budget or λ), error bars over seeds."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 5))
    for i, mode in enumerate(FEATURE_MODES):
        pts = []
        for row in rows:
            if row.mode != mode or not row.values("test_auc"):
                continue
            kept = stat(_features_kept(r) for r in row.runs)
            if kept is not None:
                pts.append((kept, row.values("test_auc"), row.budget_text if row.budget else row.short_label))
        if not pts:
            continue
        pts.sort(key=lambda p: p[0].mean)
        ax.errorbar([k.mean for k, _, _ in pts], [a.mean for _, a, _ in pts], xerr=[k.std or 0 for k, _, _ in pts],
                    yerr=[a.std or 0 for _, a, _ in pts], marker="os"[i], capsize=3, linewidth=1.2,
                    label=f"{mode} (n={'/'.join(str(a.n) for _, a, _ in pts)})")
        for k, a, text in pts:  # which budget / λ each point is
            ax.annotate(text.replace(f"{mode} · ", ""), (k.mean, a.mean), textcoords="offset points",
                        xytext=(4, 6 if i == 0 else -12), fontsize=7)
    _draw_reference(ax, ref)
    ax.margins(x=0.1, y=0.08)  # room for the point labels inside the axes
    ax.set_xlabel("input features kept (mean over seeds)")
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return _save(fig, path)


def _history_file(run: Run) -> Path | None:
    p = run.path / "sparsity_history.json"
    return p if p.exists() else None


def _read_history(run: Run) -> list[dict] | None:
    p = _history_file(run)
    if p is None:
        return None
    try:
        hist = json.loads(p.read_text()).get("history") or []
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise ReportError(f"cannot read {p}: {err}") from None
    return hist if any(k.startswith("kept/") for h in hist for k in h) else None


def representative_runs(rows: list[Row]) -> list[tuple[Row, Run, list[dict]]]:
    """Per mode with kept-group history: its most-run setting, the tightest budget, the lowest seed."""
    chosen = []
    for mode in sorted({r.mode for r in rows if not r.is_dense}):
        cands = [r for r in rows if r.mode == mode]
        variant_n = Counter()
        for r in cands:
            variant_n[r.variant] += len(r.runs)
        cands.sort(key=lambda r: (-variant_n[r.variant], r.variant, [v for _, v in r.budget] or [1.0]))
        for row in cands:
            picked = next(((run, h) for run in row.runs if (h := _read_history(run))), None)
            if picked:
                chosen.append((row, *picked))
                break
    return chosen


def _dense_counts(run: Run, hist: list[dict]) -> dict[str, float]:
    """What each kept/ series counts in the dense model: the summary's dense widths, else the series' max."""
    dense = dict((run.summary.get("kept") or {}).get("dense_neurons") or {})
    out = {}
    for key in sorted({k for h in hist for k in h if k.startswith("kept/")}):
        layer = key.removeprefix("kept/").removeprefix("neurons:")
        vals = [h[key] for h in hist if isinstance(h.get(key), (int, float))]
        out[key] = float(dense.get(layer) or max(vals, default=1.0) or 1.0)
    return out


def plot_kept_groups(chosen, path: Path) -> Path:
    """Kept groups per layer (fraction of the dense count) over the compress stage's steps (paper Fig. 6)."""
    plt = _plt()
    n = len(chosen)
    cols = min(n, 2)
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(7.5 * cols, 4.2 * rows_n), squeeze=False)
    for ax, (row, run, hist) in zip(axes.flat, chosen):
        dense = _dense_counts(run, hist)
        for key, total in dense.items():
            pts = [(h["step"], h[key] / total) for h in hist if isinstance(h.get(key), (int, float))]
            name = key.removeprefix("kept/").removeprefix("neurons:")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], linewidth=1.4,
                    label=f"{name} ({pts[-1][1] * total:.0f}/{total:.0f})")
        ax.set_title(f"{row.short_label}, {row.budget_text}, seed {run.seed}", fontsize=10)
        ax.set_xlabel("training step (compress stage)")
        ax.set_ylabel("kept groups / dense")
        ax.set_ylim(-0.03, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
                  title="layer (kept/dense at end)", title_fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    return _save(fig, path)


def build_figures(rows: list[Row], runs: list[Run], out: Path) -> list[Path]:
    ref = reference_line(rows, runs)
    data, model = _run_key(runs[0], "data"), _run_key(runs[0], "model")
    figures = []
    if any(not r.is_dense for r in rows):
        figures.append(plot_auc_vs_ratio(rows, ref, out / "auc_vs_ratio.png", f"{data} / {model}"))
    chosen = representative_runs(rows)
    if chosen:
        figures.append(plot_kept_groups(chosen, out / "kept_groups.png"))
    modes = {r.mode for r in rows}
    if modes & set(FEATURE_MODES):
        figures.append(plot_auc_vs_features(rows, ref, out / "auc_vs_features.png",
                                            f"input features kept ({data} / {model})"))
    if {"joint", "cascaded"} <= modes:
        figures.append(plot_auc_vs_ratio(rows, ref, out / "joint_vs_cascaded.png",
                                         f"joint vs cascaded ({data} / {model})", modes=("joint", "cascaded")))
    return figures


# ---------------------------------------------------------------------------------------------- wandb


def log_wandb(rows: list[Row], figures: list[Path], out: Path, root: Path) -> Path:
    """The table as a wandb.Table and the figures as wandb.Image, in an offline run (WANDB_MODE) under out."""
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    mixed = len(set().union(*(row.ref_kinds for row in rows))) > 1
    run = wandb.init(project="umec-report", job_type="report", dir=str(out), name=f"report-{root.name}",
                     config={"root": str(root)})
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
    rows = build_rows(runs)
    out.mkdir(parents=True, exist_ok=True)
    figures = build_figures(rows, runs, out)
    report = write_text(out / "report.md", render_markdown(root, runs, rows, figures))
    result = {"report": report, "figures": figures, "rows": rows}
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
    print(f"wrote {result['report']} ({len(result['rows'])} rows)")
    for p in result["figures"]:
        print(f"wrote {p}")
    if "wandb_dir" in result:
        print(f"wandb run: {result['wandb_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
