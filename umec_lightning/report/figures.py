"""The paper's figures from the rows: AUC vs ratio (Fig. 2/4), AUC vs features kept (Fig. 4), kept groups
per layer (Fig. 6), joint vs cascaded (Fig. 8)."""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from pathlib import Path

from ..errors import ReportError
from ..io import write_bytes
from .rows import Row, reference_line, stat
from .runs import Run, _run_key

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
            rows_here = [r for r in comp if r.short_label == name and (not r.budget or res in dict(r.budget))]
            pts = [(r.values(f"{res}_ratio"), r.values("test_auc"), r) for r in rows_here]
            pts = sorted(((x, y, r) for x, y, r in pts if x is not None), key=lambda p: p[0].mean)
            if not pts:
                continue
            color, marker = style[name]
            ax.errorbar([x.mean for x, _, _ in pts], [y.mean for _, y, _ in pts],
                        xerr=[x.std or 0 for x, _, _ in pts], yerr=[y.std or 0 for _, y, _ in pts],
                        color=color, marker=marker, capsize=3, linewidth=1.2, markersize=6,
                        label=f"{name} (n={'/'.join(str(y.n) for _, y, _ in pts)})")
            bad = [(x.mean, y.mean) for x, y, r in pts if any(run.summary.get("quality_collapse") for run in r.runs)]
            if bad:  # a met budget on a model that lost what the dense one knew: crossed out
                ax.scatter([p[0] for p in bad], [p[1] for p in bad], marker="x", s=160, color="red", zorder=5,
                           label=f"{name}: quality collapse")
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


