"""The paper's figures from the rows: AUC vs ratio (Fig. 2/4), AUC vs features kept (Fig. 4), kept groups
per layer (Fig. 6), joint vs cascaded (Fig. 8)."""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import ReportError
from ..io import write_bytes
from .rows import Row, Stat, stat
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
            "pretrained": "pretrained dense"}.get(kind, kind)


@dataclass
class ReferenceLine:
    """A dense reference line: the per-seed references the table's ΔAUC used for the rows it stands for."""

    kinds: tuple[str, ...]
    scope: str  # "" when it is every plotted row's reference, else "for <the rows it is the reference of>"
    auc: Stat

    @property
    def label(self) -> str:
        kind = " / ".join(_ref_text(k) for k in self.kinds)
        return f"{kind}: {self.auc.fmt()} (n={self.auc.n})" + (f"\n{self.scope}" if self.scope else "")


def _per_seed(row: Row) -> dict | None:
    """seed -> (kind, reference test AUC) of the row's runs, as the table used them (`Row.refs`); None when one
    seed has two references in the row."""
    per_seed: dict = {}
    for run, ref in zip(row.runs, row.refs):
        if ref is not None and per_seed.setdefault(run.seed, (ref[0], ref[1])) != (ref[0], ref[1]):
            return None
    return per_seed


def _rows_text(rows: list[Row], shown: int = 2) -> str:
    names = [f"{r.short_label} {r.budget_text}" for r in rows]
    return ", ".join(names[:shown]) + (f" +{len(names) - shown} more" if len(names) > shown else "")


def references(rows: list[Row]) -> list[ReferenceLine]:
    """The dense reference lines of a figure over `rows`: the references the table's ΔAUC compares these rows
    with (`Row.refs`), one value per seed, mean ± std over seeds. One line when every seed has one reference
    across the rows; else rows are grouped by the references they agree on (a sweep with one control per
    budget or per epoch total gets one line per control set), each line naming its rows."""
    groups: list[tuple[list[Row], dict | None]] = []
    for row in rows:
        if not any(ref is not None for ref in row.refs):
            continue
        mine = _per_seed(row)
        for members, per_seed in groups:
            if mine is not None and per_seed is not None and all(per_seed.get(k, v) == v for k, v in mine.items()):
                members.append(row)
                per_seed.update(mine)
                break
        else:
            groups.append(([row], None if mine is None else dict(mine)))
    out = []
    for members, per_seed in groups:
        values = ([v for _, v in per_seed.values()] if per_seed is not None
                  else [ref[1] for row in members for ref in row.refs if ref is not None])
        kinds = tuple(sorted({kind for row in members for kind in row.ref_kinds}))
        out.append(ReferenceLine(kinds, "" if len(groups) == 1 else f"for {_rows_text(members)}", stat(values)))
    return out


_REF_STYLES = ("--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)))


def _draw_references(ax, refs: list[ReferenceLine]) -> None:
    for i, ref in enumerate(refs):
        ax.axhline(ref.auc.mean, color="black" if i == 0 else "dimgray", linestyle=_REF_STYLES[i % len(_REF_STYLES)],
                   linewidth=1.2, label=ref.label, gid="reference")
        if ref.auc.std:
            ax.axhspan(ref.auc.mean - ref.auc.std, ref.auc.mean + ref.auc.std, color="grey",
                       alpha=0.2 / len(refs), linewidth=0)


def _resources(rows: list[Row]) -> list[str]:
    used = sorted({k for row in rows for k, _ in row.budget})
    return used or ["flops"]


def _collapsed(run: Run) -> bool:
    return bool(run.summary.get("quality_collapse"))


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# The narrowest ranges the AUC-vs-ratio axes show: budgets met exactly would otherwise zoom the ratio axis to
# its float noise, one point the AUC axis to nothing.
MIN_RATIO_SPAN = 0.1
MIN_AUC_SPAN = 0.01


def _span(values: list[float], minimum: float, pad: float = 0.08) -> tuple[float, float] | None:
    """(lo, hi) around `values`, at least `minimum` wide, padded by `pad` of the span on each side."""
    if not values:
        return None
    lo, hi = min(values), max(values)
    if hi - lo < minimum:
        mid = (lo + hi) / 2
        lo, hi = mid - minimum / 2, mid + minimum / 2
    margin = pad * (hi - lo)
    return lo - margin, hi + margin


def auc_vs_ratio_figure(rows: list[Row], title: str, modes: tuple[str, ...] | None = None):
    """Test AUC vs the measured ratio of the budgeted resource, one series per method (paper Fig. 2/4).

    Runs that collapsed (summary `quality_collapse`) stay out of the series' means and of the AUC axis: each is
    a marker at the axis' bottom edge, at its ratio, with its AUC written by it — so one collapsed run does
    not squash every other series into a line. The dense lines are the references the table compares these
    rows with (`references`); the ratio axis spans at least `MIN_RATIO_SPAN` around the budgets and points."""
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
        on_axis = [r for r in comp if not r.budget or res in dict(r.budget)]
        xs, ys, collapsed = [], [], []
        for name in series:
            pts = []
            for row in (r for r in on_axis if r.short_label == name):
                healthy = [run for run in row.runs if not _collapsed(run)]
                x = stat(run.summary.get(f"{res}_ratio") for run in healthy)
                y = stat(run.summary.get("test_auc") for run in healthy)
                if x is not None and y is not None:
                    pts.append((x, y))
                collapsed += [(name, ratio, auc) for run in row.runs if _collapsed(run)
                              if (ratio := _number(run.summary.get(f"{res}_ratio"))) is not None
                              and (auc := _number(run.summary.get("test_auc"))) is not None]
            if not pts:
                continue
            pts.sort(key=lambda p: p[0].mean)
            color, marker = style[name]
            ax.errorbar([x.mean for x, _ in pts], [y.mean for _, y in pts],
                        xerr=[x.std or 0 for x, _ in pts], yerr=[y.std or 0 for _, y in pts],
                        color=color, marker=marker, capsize=3, linewidth=1.2, markersize=6,
                        label=f"{name} (n={'/'.join(str(y.n) for _, y in pts)})")
            xs += [v for x, _ in pts for v in (x.mean - (x.std or 0), x.mean + (x.std or 0))]
            ys += [v for _, y in pts for v in (y.mean - (y.std or 0), y.mean + (y.std or 0))]
        refs = references(on_axis)
        _draw_references(ax, refs)
        ys += [v for ref in refs for v in (ref.auc.mean - (ref.auc.std or 0), ref.auc.mean + (ref.auc.std or 0))]
        budgets = sorted({dict(r.budget)[res] for r in on_axis if r.budget})
        for i, b in enumerate(budgets):
            ax.axvline(b, color="grey", linestyle=":", linewidth=0.8, label="budget" if i == 0 else None,
                       gid="budget")
        xlim = _span(xs + [c[1] for c in collapsed] + budgets, MIN_RATIO_SPAN, pad=0.05)
        if xlim is not None:
            ax.set_xlim(*xlim)
        ylim = _span(ys or [c[2] for c in collapsed], MIN_AUC_SPAN)
        if ylim is not None:
            ax.set_ylim(*ylim)
        _draw_collapsed(ax, collapsed, style)
        ax.set_xlabel(f"measured {res} ratio (compressed / dense)")
        ax.set_ylabel("test AUC (mean ± std over seeds)")
        ax.set_title(f"{title}: budget on {res}")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


# Where a collapsed run's marker sits: just inside the bottom edge of the AUC axis (axes fraction).
COLLAPSED_Y = 0.03


def _draw_collapsed(ax, collapsed: list[tuple[str, float, float]], style: dict) -> None:
    """Collapsed runs at the bottom edge of the axis (x: their ratio; y: `COLLAPSED_Y` of the axis height, so
    never in the AUC range), their AUC written by them."""
    if not collapsed:
        return
    edge = ax.get_xaxis_transform()  # x in data, y in axes fractions
    for name in sorted({c[0] for c in collapsed}):
        mine = [c for c in collapsed if c[0] == name]
        color, _ = style[name]
        aucs = ", ".join(f"{c[2]:.3f}" for c in mine)
        ax.plot([c[1] for c in mine], [COLLAPSED_Y] * len(mine), transform=edge, linestyle="none", marker="v",
                markersize=9, color=color, markeredgecolor="red", markeredgewidth=1.5, clip_on=False, zorder=6,
                gid="collapsed", label=f"{name}: {len(mine)} collapsed (test AUC {aucs}), at the bottom edge, "
                                       "not in the means")
        for _, ratio, auc in mine:
            ax.annotate(f"collapsed\nAUC {auc:.3f}", (ratio, COLLAPSED_Y), xycoords=edge, xytext=(0, 8),
                        textcoords="offset points", ha="center", va="bottom", fontsize=7, color="red")


def plot_auc_vs_ratio(rows: list[Row], path: Path, title: str, modes: tuple[str, ...] | None = None) -> Path:
    return _save(auc_vs_ratio_figure(rows, title, modes), path)


FEATURE_MODES = ("input_selection", "group_lasso")  # the paper's Fig. 4: what each keeps of the inputs


def _features_kept(run: Run) -> int | None:
    features = (run.summary.get("kept") or {}).get("features")
    return None if features is None else len([f for f in features if f != "dense"])


def auc_vs_features_figure(rows: list[Row], title: str):
    """Test AUC vs the number of input features kept, input selection against group lasso (paper Fig. 4);
    a point per row (budget or λ), error bars over seeds; the dense lines are the table's references."""
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
    _draw_references(ax, references([r for r in rows if r.mode in FEATURE_MODES and r.values("test_auc")]))
    ax.margins(x=0.1, y=0.08)  # room for the point labels inside the axes
    ax.set_xlabel("input features kept (mean over seeds)")
    ax.set_ylabel("test AUC (mean ± std over seeds)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def plot_auc_vs_features(rows: list[Row], path: Path, title: str) -> Path:
    return _save(auc_vs_features_figure(rows, title), path)


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


def _kept_counts(run: Run) -> dict | None:
    """What the extracted model keeps, per kind: summary.json's `kept` (the model as rebuilt, by name), else the
    run's `kept.json` (the extraction's own record). {"features": n, "neurons": {layer: n}, "dims": {table:
    width}, "pairs": n or None}; None when the run has neither."""
    kept = run.summary.get("kept")
    if isinstance(kept, dict) and "neurons" in kept:
        return {"features": len(kept.get("features") or []), "neurons": dict(kept["neurons"]),
                "dims": dict(kept.get("dims") or {}), "pairs": kept.get("pairs")}
    record = run.path / "kept.json"
    if not record.exists():
        return None
    try:
        kept = json.loads(record.read_text())["kept"]
        pairs = kept.get("pairs")
        return {"features": int(bool(kept["use_dense"])) + len(kept["feature_ids"]),
                "neurons": {k: len(v) for k, v in kept["neurons"].items()},
                "dims": {k: len(v) for k, v in kept["dims"].items()}, "pairs": None if pairs is None else len(pairs)}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise ReportError(f"cannot read {record}: {err}") from None


def extracted_groups(run: Run, keys) -> dict[str, float]:
    """Per `kept/<set>` series: the groups of that set the extracted model keeps (what ADMM's masks became after
    the extraction completed them to the budget); sets it cannot tell are left out."""
    counts = _kept_counts(run)
    if counts is None:
        return {}
    cfg = run.config or {}
    block = int(cfg.get("mode.method.admm.dim_block") or cfg.get("mode.method.dim_block") or 1)
    neurons, dims = counts["neurons"], counts["dims"]
    out = {}
    for key in keys:
        name = key.removeprefix("kept/")
        if name == "features":
            out[key] = float(counts["features"])
        elif name.startswith("neurons:"):
            layer = name.removeprefix("neurons:")
            if layer in neurons:
                out[key] = float(neurons[layer])
            elif layer.startswith("dense.") and not any(k.startswith("dense.") for k in neurons):
                out[key] = 0.0  # the dense block is gone, with its MLP
        elif name == "dims":  # `dot`: one shared width, also the last bottom layer's (all tables may be gone)
            bottom = sorted((int(k.rsplit(".", 1)[1]), v) for k, v in neurons.items() if k.startswith("dense."))
            widths = set(dims.values()) or ({bottom[-1][1]} if bottom else set())
            if len(widths) == 1:
                out[key] = float(math.ceil(widths.pop() / block))
        elif name.startswith("dims:"):
            out[key] = float(math.ceil(dims.get(name.removeprefix("dims:"), 0) / block))  # absent: table gone
        elif name == "pairs" and isinstance(counts["pairs"], int):
            out[key] = float(counts["pairs"])
    return out


def kept_groups_figure(chosen):
    """Kept groups per layer (fraction of the dense count) over the compress stage's steps (paper Fig. 6): ADMM's
    masks as logged, and at each curve's end a star where the extracted model is (what the extraction kept
    of that set, from summary.json / kept.json), joined to the curve by a dotted line."""
    from matplotlib.lines import Line2D

    plt = _plt()
    n = len(chosen)
    cols = min(n, 2)
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(7.5 * cols, 4.2 * rows_n), squeeze=False)
    for ax, (row, run, hist) in zip(axes.flat, chosen):
        dense = _dense_counts(run, hist)
        extracted = extracted_groups(run, dense)
        for key, total in dense.items():
            pts = [(h["step"], h[key] / total) for h in hist if isinstance(h.get(key), (int, float))]
            name = key.removeprefix("kept/").removeprefix("neurons:")
            end = pts[-1][1] * total
            label = f"{name} ({end:.0f}/{total:.0f})"
            if key in extracted:
                label = f"{name} ({end:.0f} → {extracted[key]:.0f}/{total:.0f})"
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], linewidth=1.4, label=label,
                              marker="o" if len(pts) < 3 else None, markersize=3)
            if key in extracted:
                step, frac = pts[-1][0], extracted[key] / total
                ax.plot([step, step], [pts[-1][1], frac], color=line.get_color(), linestyle=":", linewidth=1.0)
                ax.plot([step], [frac], linestyle="none", marker="*", markersize=13, color=line.get_color(),
                        markeredgecolor="black", markeredgewidth=0.8, zorder=5, gid=f"extracted:{key}")
        ax.set_title(f"{row.short_label}, {row.budget_text}, seed {run.seed}", fontsize=10)
        ax.set_xlabel("training step (compress stage)")
        ax.set_ylabel("kept groups / dense")
        ax.set_ylim(-0.03, 1.05)
        ax.margins(x=0.04)
        ax.grid(alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        title = "layer (kept/dense at ADMM's end)"
        if extracted:
            handles.append(Line2D([], [], linestyle="none", marker="*", markersize=11, color="white",
                                  markeredgecolor="black", label="extracted model"))
            title = "layer (ADMM's end → extracted model, of dense)"
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False,
                  title=title, title_fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def plot_kept_groups(chosen, path: Path) -> Path:
    return _save(kept_groups_figure(chosen), path)


def build_figures(rows: list[Row], runs: list[Run], out: Path) -> list[Path]:
    data, model = _run_key(runs[0], "data"), _run_key(runs[0], "model")
    figures = []
    if any(not r.is_dense for r in rows):
        figures.append(plot_auc_vs_ratio(rows, out / "auc_vs_ratio.png", f"{data} / {model}"))
    chosen = representative_runs(rows)
    if chosen:
        figures.append(plot_kept_groups(chosen, out / "kept_groups.png"))
    modes = {r.mode for r in rows}
    if modes & set(FEATURE_MODES):
        figures.append(plot_auc_vs_features(rows, out / "auc_vs_features.png",
                                            f"input features kept ({data} / {model})"))
    if {"joint", "cascaded"} <= modes:
        figures.append(plot_auc_vs_ratio(rows, out / "joint_vs_cascaded.png",
                                         f"joint vs cascaded ({data} / {model})", modes=("joint", "cascaded")))
    return figures
