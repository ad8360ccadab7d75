"""Sparsity logging during a compress stage: kept groups per set (paper Fig. 6), resource vs budget, the duals and the
loss (Fig. 7), to every logger (W&B, CSV) and, at the end, as PNGs in the run dir."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl

from umec_lightning.io import write_json


class SparsityLogger(pl.Callback):
    """Every n steps: the method's `log_values()` (its only host sync) to the loggers and, with the input
    features it would remove right now, to `pl_module.compression_history` (checkpointed with the module,
    so a resumed stage plots the whole phase). At the end, `<out_dir>/sparsity_history<suffix>.json` and
    the PNGs, for the user."""

    def __init__(self, every_n_steps: int = 50, out_dir: str | Path | None = None, suffix: str = ""):
        self.every_n_steps = max(1, int(every_n_steps))
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.suffix = suffix

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        method = pl_module.compression
        step = trainer.global_step
        if method is None or (step - 1) % self.every_n_steps:
            return
        values = method.log_values()
        if not values:
            return
        if pl_module.last_loss is not None:
            values["loss"] = pl_module.last_loss
        pl_module.log_dict({f"{pl_module.phase}/{k}": v for k, v in values.items()}, on_step=True, on_epoch=False)
        # Which inputs are pruned right now, by name: shows the order in which features go.
        pl_module.compression_history.append({"step": step, **values, "pruned_features": method.pruned_features()})

    def on_train_end(self, trainer, pl_module) -> None:
        history = pl_module.compression_history
        if self.out_dir is None or not trainer.is_global_zero or not history:
            return
        budgets = dict(getattr(pl_module.compression, "budgets", {}))
        write_json(self.out_dir / f"sparsity_history{self.suffix}.json", {"budgets": budgets, "history": history})
        plot_sparsity(history, budgets, self.out_dir, self.suffix)
        meta = getattr(getattr(trainer, "datamodule", None), "meta", None)
        plot_feature_scores(history, self.out_dir, self.suffix, getattr(meta, "noise_features", None))


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
    """feature_scores<suffix>.png: every feature group's score over the steps (what ADMM ranks by; the
    lowest are pruned first), planted noise features (synthetic data) in red. None without feature groups."""
    keys = sorted({k for h in history for k in h if k.startswith("feature_score/")})
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    noise = set(noise or [])
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(8, 5))
    for key in keys:
        name = key.split("/", 1)[1]
        is_noise = name in noise
        ax.plot(steps, [h.get(key, float("nan")) for h in history], color="tab:red" if is_noise else "tab:gray",
                alpha=0.9 if is_noise else 0.5, linewidth=1.6 if is_noise else 0.9,
                label=name if is_noise else None)
    title = "feature group scores (lowest pruned first)" + (": planted noise in red" if noise else "")
    ax.set(title=title, xlabel="step", ylabel="score / set scale", yscale="log")
    if noise:
        ax.legend(fontsize=7, title="noise")
    fig.tight_layout()
    path = out_dir / f"feature_scores{suffix}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
