"""report.md: the table, its reference legend, the best method per budget and the members that failed.

Tie rule (a ΔAUC against the control, and the best method against the next per budget): a difference is called
only when it is beyond *both* sources of noise the report can see: the seed std of the per-seed differences
(training randomness; needs n >= 2 seeds) and the test rows (DeLong's paired contrast test of the seed-mean exact
ΔAUC on the shared rows, p < 0.05; significance.py). Either one saying tie makes it a tie; with neither available
(one seed, no per-row predictions) there is no tie call.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from .rows import Reference, Row, Stat, is_tie, row_latency, run_epochs
from .runs import REF_LABELS, REF_LABELS_EARLY_STOPPING, REF_MARKS, Failure, Run, _run_key
from .significance import ALPHA, RowTest, between

# ---------------------------------------------------------------------------------------------- markdown

COLUMNS = ["method", "budget", "n", "seeds", "flops ratio", "params ratio", "test AUC", "test logloss", "ΔAUC",
           "Δlogloss", "latency ratio", "budget met", "exact test AUC [95% CI, test rows]",
           "exact ΔAUC [95% CI], paired test on the test rows", "epochs run: row · control"]
DELTA = COLUMNS.index("ΔAUC")


def _cell(s: Stat | None, digits: int = 4, sign: bool = False) -> str:
    return "–" if s is None else s.fmt(digits, sign)


def _p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def row_verdict(seed_tie: bool | None, test: RowTest | None) -> bool | None:
    """The tie rule (module docstring): True a tie, False a difference, None no call."""
    row_tie = None if test is None or test.contrast is None else not test.significant
    if seed_tie is None and row_tie is None:
        return None
    return bool(seed_tie) or bool(row_tie)


def delta_cell(row: Row, mark: bool) -> str:
    if row.mode == "dense_control":
        return "reference"
    d = row.delta
    if d is None:
        return "–"
    text = d.fmt(4, sign=True)
    tie = row_verdict(is_tie(d), row.paired)
    text += " (tie)" if tie else "" if tie is not None else " (n=1: no tie call)"
    if mark:
        text += "".join(REF_MARKS[k] for k in sorted(row.ref_kinds))
    return text


def _coverage(test: RowTest) -> str:
    """What a test left out: runs without usable predictions, several row sets."""
    parts = []
    if test.used < test.total:
        parts.append(f"{test.used} of {test.total} runs: " + ", ".join(test.notes))
    if test.row_sets > 1:
        parts.append(f"{test.row_sets} sets of test rows, added as independent")
    return f" ({'; '.join(parts)})" if parts else ""


def auc_interval_cell(row: Row) -> str:
    test = row.auc_test
    if test is None or test.contrast is None:
        return "–" + (f" ({', '.join(test.notes)})" if test is not None and test.notes else "")
    c = test.contrast
    return f"{c.value:.4f} [{c.low:.4f}, {c.high:.4f}]" + _coverage(test)


def paired_cell(row: Row) -> str:
    if row.mode == "dense_control":
        return "reference"
    test = row.paired
    if test is None:
        return "–"
    if test.contrast is None:
        return "– (" + ", ".join(test.notes) + ")" if test.notes else "–"
    c = test.contrast
    return f"{c.value:+.4f} [{c.low:+.4f}, {c.high:+.4f}] {_p(c.p)}" + _coverage(test)


def _span(values: list[int]) -> str:
    return "?" if not values else str(values[0]) if values[0] == values[-1] else f"{values[0]}–{values[-1]}"


def control_epochs_text(refs: list[Reference]) -> str:
    """What the controls really trained: epochs run, and with early stopping on, the most they could and whether
    the rule ended them."""
    run = sorted({r.epochs_run for r in refs if r.epochs_run is not None})
    most = sorted({r.epochs for r in refs if r.epochs is not None})
    if not run:  # an older summary: only the most it could train is known
        return f"≤{_span(most)} (epochs run not recorded)" if most else "?"
    text = _span(run)
    if any(r.early_stopping for r in refs):
        stopped = sum(1 for r in refs if r.stopped_early)
        text += f" of ≤{_span(most)}" if most else ""
        text += f", stopped early ({stopped}/{len(refs)})" if stopped else ", early stopping on, not triggered"
    return text


def epochs_cell(row: Row) -> str:
    mine = sorted({e for r in row.runs if (e := run_epochs(r)) is not None})
    own = _span(mine)
    if row.mode == "dense_control":
        early = any((r.config or {}).get("phases.early_stopping.patience") is not None for r in row.runs)
        stopped = sum(1 for r in row.runs if r.summary.get("stopped_early"))
        return own + (f", stopped early ({stopped}/{len(row.runs)})" if stopped else
                      ", early stopping on, not triggered" if early else "") + " · reference"
    refs = [ref for ref in row.refs if ref is not None]
    control = control_epochs_text(refs) if refs else "–"
    return "–" if not mine and control in ("?", "–") else f"{own} · {control}"


def budget_met_cell(row: Row) -> str:
    """Runs that met the budget, out of all; "⚠ k collapsed" where k of them lost more than the collapse
    threshold of the dense model's lift over chance (`quality_collapse`): met, but not a model to use."""
    met = [r.summary.get("budget_met") for r in row.runs]
    known = [m for m in met if m is not None]
    cell = f"{sum(1 for m in known if m)}/{len(row.runs)}" if known else "–"
    collapsed = collapsed_runs(row)
    return f"{cell} ⚠ {collapsed} collapsed" if collapsed else cell


def collapsed_runs(row: Row) -> int:
    return sum(1 for r in row.runs if r.summary.get("quality_collapse"))


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
        "reference" if row.mode == "dense_control" else _cell(row.delta_logloss, 4, sign=True),
        " · ".join(f"b{b}: {s.fmt(2)}" for b, s in lat.items()) if lat else "–",
        budget_met_cell(row),
        auc_interval_cell(row),
        paired_cell(row),
        epochs_cell(row),
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
            seed_tie = None if not stds else gap < max(stds)
            test = between(best.runs, nxt.runs, best.store) if best.store is not None else None
            line += f"; next {nxt.label} {nauc.fmt()} (n={nauc.n}), gap {gap:.4f}{_best_verdict(seed_tie, test)}"
        else:
            line += " (the only method at this budget)"
        lines.append(line)
    return lines


def _best_verdict(seed_tie: bool | None, test: RowTest | None) -> str:
    """The best-vs-next verdict of the tie rule, with what each of its two criteria said."""
    said = []
    if seed_tie is not None:
        said.append("the gap is below the seed std" if seed_tie else "the gap is beyond the seed std")
    if test is not None and test.contrast is not None:
        said.append(f"{_p(test.contrast.p)} on the test rows (paired DeLong{_coverage(test)})")
    elif test is not None and test.notes:
        said.append("no paired test: " + ", ".join(test.notes))
    tie = row_verdict(seed_tie, test)
    verdict = "no tie call" if tie is None else "a tie" if tie else "ahead"
    return f" — {verdict} ({'; '.join(said)})" if said else f" — {verdict}"


def _reference_label(kind: str, rows: list[Row]) -> str:
    early = any(ref.early_stopping for row in rows for ref in row.refs if ref is not None and ref.kind == kind)
    return REF_LABELS_EARLY_STOPPING[kind] if early and kind in REF_LABELS_EARLY_STOPPING else REF_LABELS[kind]


def failures_section(root: Path, failures: list[Failure]) -> list[str]:
    """Every failed member, with its one-line reason and its overrides."""
    if not failures:
        return []
    out = ["", f"## Failed members ({len(failures)})", "",
           "Not in the table: these members wrote `failed.json` (the multirun exited with status 1)."]
    for f in failures:
        where = f.path.relative_to(root) if f.path.is_relative_to(root) else f.path
        job = f"job {f.record['job']}, " if f.record and f.record.get("job") is not None else ""
        if f.record is None:
            kind = ""
        elif f.record.get("user_error"):
            kind = "bad input: "
        else:
            kind = "bug (traceback in failed.json): "
        overrides = " ".join(f.overrides)
        stale = "; its summary.json (an earlier run's) is left out" if f.has_summary else ""
        out.append(f"- `{where}` ({job}overrides: `{overrides or '–'}`): {kind}{f.reason}{stale}".replace("|", "\\|"))
    return out


def render_markdown(root: Path, runs: list[Run], rows: list[Row], figures: list[Path],
                    failures: list[Failure] | None = None) -> str:
    kinds = sorted(set().union(*(row.ref_kinds for row in rows)))
    mixed = len(kinds) > 1
    columns = list(COLUMNS)
    if len(kinds) == 1:
        columns[DELTA] = f"ΔAUC vs {_reference_label(kinds[0], rows)}"
    elif mixed:
        columns[DELTA] = "ΔAUC vs dense (reference marked per cell)"
    data, model = _run_key(runs[0], "data"), _run_key(runs[0], "model")
    out = [
        "# Comparison report",
        "",
        f"{len(runs)} runs below `{root}`; data `{data}`, model `{model}`. One row per (mode/method, budget), "
        "aggregated over seeds: mean ± sample std (ddof=1) over n seeds. Ratios are measured on the extracted "
        "model (compressed/dense); latency ratio is compressed/dense per batch size (bN). Δlogloss: against the same "
        "reference (lower is better). \"⚠ k collapsed\": k runs met the budget but lost more than the collapse "
        "threshold of the dense model's validation AUC above 0.5 (`quality_collapse` in summary.json).",
        *(["", f"**{len(failures)} member(s) failed** and are not in the table: see *Failed members* below."]
          if failures else []),
        "",
        "**Significance.** `test AUC` and `ΔAUC` are the summaries' (binned AUROC, `eval.auroc_bins`) over seeds. "
        "The last columns are computed from each run's per-row test predictions (`test_predictions` in "
        "summary.json): the exact AUC averaged over the seeds with its DeLong 95% interval, and the seed-mean exact "
        "ΔAUC against the same references with DeLong's paired contrast test on the same test rows (every seed's "
        "run and control are scored on the same rows, so their AUCs' covariance over the rows is accounted for). "
        "That interval is the test rows' uncertainty for these trained models; the seed std is the training's. "
        f"**Tie rule:** a ΔAUC is marked (tie) when its |mean| is below the seed std of the per-seed differences "
        f"or the paired test gives p ≥ {ALPHA:g}; with one seed and no predictions there is no tie call.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row_cells(row, mixed)) + " |" for row in rows]
    if mixed:
        out += ["", "ΔAUC references: " + "; ".join(f"{REF_MARKS[k]} {_reference_label(k, rows)}"
                                                    for k in kinds) + "."]
    if any(ref.early_stopping for row in rows for ref in row.refs if ref is not None):
        out += ["", "Early stopping was on: each stage that can stop (pretrain, finetune) ran at most its epochs, "
                "until its validation stopped improving, and so did the dense controls (the same rule, at most as "
                "many epochs as the compressed run in all): they are not equal-epochs models. `epochs run` says what "
                "each really trained."]
    dup = [f"{row.label} ({row.budget_text}): seed {s}" for row in rows
           for s, n in Counter(map(str, row.seeds)).items() if n > 1]
    if dup:
        out += ["", "Note: the same seed appears more than once (identical config) in: " + "; ".join(dup) + "."]
    best = best_per_budget(rows)
    if best:
        out += ["", "## Best mean test AUC per budget", "", *best]
    out += failures_section(root, failures or [])
    if figures:
        out += ["", "## Figures", "", *[f"![{p.stem}]({p.name})" for p in figures]]
    return "\n".join(out) + "\n"


