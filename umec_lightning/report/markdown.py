"""report.md: the table, its reference legend and the best method per budget."""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path

from .rows import Row, Stat, is_tie, row_latency
from .runs import REF_LABELS, REF_MARKS, Run, _run_key

# ---------------------------------------------------------------------------------------------- markdown

COLUMNS = ["method", "budget", "n", "seeds", "flops ratio", "params ratio", "test AUC", "test logloss", "ΔAUC",
           "Δlogloss", "latency ratio", "budget met"]


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
    epochs = sorted({r.summary["dense_same_epochs"] for r in row.runs if "dense_same_epochs" in r.summary})
    if epochs and "same_epochs" in row.ref_kinds:  # methods train different totals: say which control
        text += f" vs {'/'.join(map(str, epochs))} ep"
    return text


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
        "below the seed std of the per-seed differences is marked (tie). Δlogloss: against the same reference "
        "(lower is better). \"⚠ k collapsed\": k runs met the budget but lost more than the collapse threshold of "
        "the dense model's validation AUC above 0.5 (`quality_collapse` in summary.json).",
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


