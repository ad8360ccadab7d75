"""The figures of a compress stage's sparsity history (`sparsity_history<suffix>.json`, written by the `Compression`
callback): kept groups per set (paper Fig. 6), resource vs budget, the duals and the loss (Fig. 7), and every
feature group's score as ADMM ranks it."""

from __future__ import annotations

from pathlib import Path


def plot_sparsity(history: list[dict], budgets: dict[str, float], out_dir: Path, suffix: str = "") -> list[Path]:
    """sparsity_curves<suffix>.png (kept fraction per set, resource vs budget, duals) and loss_curve<suffix>.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    keys = sorted({k for h in history for k, v in h.items() if isinstance(v, (int, float))})
    kept = [k for k in keys if k.startswith("kept/")]
    first = history[0]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for key in kept:
        total = max(first[key], 1.0)
        axes[0].plot(steps, [h[key] / total for h in history], label=key[5:])
    axes[0].set(title="kept groups per set (fraction of dense)", xlabel="step", ylim=(0, 1.05))
    if len(kept) <= 12:
        axes[0].legend(fontsize=7)
    for name in ("flops", "params"):
        if f"resource/{name}" not in first:
            continue
        axes[1].plot(steps, [h.get(f"resource/{name}", float("nan")) for h in history], label=f"{name} / dense")
        if name in budgets:
            axes[1].axhline(budgets[name], linestyle="--", color="gray", label=f"{name} budget")
    axes[1].set(title="resource vs budget", xlabel="step")
    axes[1].legend(fontsize=7)
    for key in keys:
        if key.startswith("z/") or (key.startswith("y/") and len(kept) <= 12):
            axes[2].plot(steps, [h[key] for h in history], label=key)
    # symlog only when the duals span decades (z can reach hundreds without a budget ramp); its default
    # ticks on a narrow range are two unreadable labels.
    peak = max([abs(h[k]) for h in history for k in keys if k.startswith(("z/", "y/"))] or [0.0])
    if peak > 10:
        axes[2].set_yscale("symlog", linthresh=0.1)
    axes[2].set(title="dual variables", xlabel="step", ylabel="value")
    axes[2].legend(fontsize=6)
    fig.tight_layout()
    paths = [out_dir / f"sparsity_curves{suffix}.png", out_dir / f"loss_curve{suffix}.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [h.get("loss", float("nan")) for h in history])
    ax.set(title="training loss while compressing", xlabel="step", ylabel="BCE")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths


def plot_feature_scores(history: list[dict], out_dir: Path, suffix: str = "",
                        noise: list[str] | None = None) -> Path | None:
    """feature_scores<suffix>.png (see `feature_scores_figure`); None without feature groups."""
    fig = feature_scores_figure(history, noise)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    path = out_dir / f"feature_scores{suffix}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def feature_scores_figure(history: list[dict], noise: list[str] | None = None):
    """Every feature group's score as ADMM ranks it (the lowest are pruned first), by feature name: over the
    steps (left; the features pruned at the last step and planted noise named at their line's end) and at the
    last step, sorted, one named bar per feature (right). Planted noise features (synthetic data) in red, the
    features ADMM prunes at the last step hatched. None without feature groups."""
    keys = sorted({k for h in history for k in h if k.startswith("feature_score/")})
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    noise = set(noise or [])
    last = history[-1]
    pruned = set(last.get("pruned_features") or [])
    steps = [h["step"] for h in history]
    names = [k.split("/", 1)[1] for k in keys]
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(13, max(5.0, 0.2 * len(keys) + 1.5)),
                                   gridspec_kw={"width_ratios": [3, 2]})
    for key, name in zip(keys, names):
        color = "tab:red" if name in noise else "tab:gray"
        ys = [h.get(key, float("nan")) for h in history]
        ax.plot(steps, ys, color=color, alpha=0.9 if name in noise else 0.5, linewidth=1.6 if name in noise else 0.9,
                marker="o" if len(steps) < 3 else None, markersize=3)
        if name in noise or name in pruned:
            ax.annotate(name, (steps[-1], ys[-1]), xytext=(3, 0), textcoords="offset points", fontsize=7,
                        color=color, va="center")
    ax.set(title="feature group scores over the steps (lowest pruned first)", xlabel="step",
           ylabel="score / set scale", yscale="log")
    ax.margins(x=0.08)  # room for the names at the lines' ends
    # The last step, by name: which features ADMM ranks lowest.
    final = sorted(((last.get(k), n) for k, n in zip(keys, names) if isinstance(last.get(k), (int, float))),
                   key=lambda p: -p[0])
    ypos = range(len(final))
    bars.barh(list(ypos), [v for v, _ in final], color=["tab:red" if n in noise else "tab:gray" for _, n in final],
              edgecolor="black", linewidth=0.4)
    for patch, (_, name) in zip(bars.patches, final):
        if name in pruned:
            patch.set_hatch("///")
    bars.set_yticks(list(ypos), [n for _, n in final], fontsize=7)
    bars.set(title=f"at the last step ({last['step']})", xlabel="score / set scale", xscale="log")
    handles = [Patch(facecolor="tab:gray", edgecolor="black", label="feature")]
    if noise:
        handles.append(Patch(facecolor="tab:red", edgecolor="black", label="planted noise"))
    if pruned:
        handles.append(Patch(facecolor="white", edgecolor="black", hatch="///", label="pruned by ADMM now"))
    bars.legend(handles=handles, fontsize=7, loc="upper right")  # the lowest bars are short
    fig.tight_layout()
    return fig
