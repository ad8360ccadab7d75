"""Sparsity logging during ADMM: kept groups per set (paper Fig. 6), resource vs budget, the duals and the
loss (Fig. 7), to every logger (W&B, CSV) and, at the end, as PNGs in the run dir."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl

from umec_lightning.io import write_json


class SparsityLogger(pl.Callback):
    def __init__(self, every_n_steps: int = 50, out_dir: str | Path | None = None):
        self.every_n_steps = max(1, int(every_n_steps))
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.history: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        umec, stats = pl_module.compression, getattr(pl_module, "last_stats", None)
        step = trainer.global_step
        if umec is None or stats is None or (step - 1) % self.every_n_steps:
            return
        values = umec.log_values(stats)  # the only host sync of the ADMM state, every n steps
        if pl_module.last_loss is not None:
            values["loss"] = pl_module.last_loss
        pl_module.log_dict({f"{pl_module.phase}/{k}": v for k, v in values.items()}, on_step=True, on_epoch=False)
        record = {"step": step, **values}
        features = next((gs for gs in umec.sets if gs.kind == "feature"), None)
        if features is not None:
            # Which inputs are pruned right now, by name: shows the order in which features go.
            mask = umec.pruned_masks()[features.name].tolist()
            record["pruned_features"] = [label for label, gone in zip(features.labels, mask) if gone]
        self.history.append(record)

    # The history is part of the checkpoint, so a resumed run plots the whole ADMM phase.
    def state_dict(self) -> dict:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))

    def on_train_end(self, trainer, pl_module) -> None:
        if self.out_dir is None or not trainer.is_global_zero or not self.history:
            return
        budgets = dict(pl_module.compression.budgets)
        write_json(self.out_dir / "sparsity_history.json", {"budgets": budgets, "history": self.history})
        plot_sparsity(self.history, budgets, self.out_dir)


def plot_sparsity(history: list[dict[str, float]], budgets: dict[str, float], out_dir: Path) -> list[Path]:
    """sparsity_curves.png (kept fraction per group set, resource vs budget, duals) and loss_curve.png."""
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
    axes[0].set(title="kept groups per set (fraction of dense)", xlabel="ADMM step", ylim=(0, 1.05))
    if len(kept) <= 12:
        axes[0].legend(fontsize=7)
    for name in ("flops", "params"):
        axes[1].plot(steps, [h[f"resource/{name}"] for h in history], label=f"{name} / dense")
        if name in budgets:
            axes[1].axhline(budgets[name], linestyle="--", color="gray", label=f"{name} budget")
    axes[1].set(title="resource vs budget", xlabel="ADMM step")
    axes[1].legend(fontsize=7)
    for key in keys:
        if key.startswith("z/") or (key.startswith("y/") and len(kept) <= 12):
            axes[2].plot(steps, [h[key] for h in history], label=key)
    axes[2].set(title="dual variables", xlabel="ADMM step", yscale="symlog")
    axes[2].legend(fontsize=6)
    fig.tight_layout()
    paths = [out_dir / "sparsity_curves.png", out_dir / "loss_curve.png"]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [h.get("loss", float("nan")) for h in history])
    ax.set(title="training loss during ADMM", xlabel="ADMM step", ylabel="BCE")
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    return paths
