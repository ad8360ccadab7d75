"""The compression of a compress stage, as one callback (Lightning's `ModelPruning` is the model): it owns the
method (`compression.method.CompressionMethod`), its hooks, its logging, its checkpointed state and the
extraction of the physically smaller model when the fit ends.

Lightning gives no hook inside a manual-optimization step, so the LightningModule calls three of this callback's
(`loss`, `after_backward`, `after_step`) where its step has them; the module lists the callback among its own
(`configure_callbacks`) and knows nothing else of compression. Every other hook of the method is called here:

    on_fit_start        the method's tensors follow the model's device (`to`)
    on_train_start      `begin` (the stage's optimizer steps), `set_holdout`, `set_optimizer`
    on_train_batch_end  every n steps and at the stage's first and last step: the method's `log_values()` (its
                        only host sync) and the input features it would remove now, to `history` and the loggers
    on_train_end        `<record_dir>/sparsity_history<suffix>.json` and its figures, for the user
    on_fit_end          `finish_and_extract`: `extracted` (a `compression.method.Extracted`), and what this process
                        decided on its own in `<record_dir>/kept.json` (`kept_rank<r>.json` under DDP), a
                        diagnostic record never read back by the run
    state_dict          the method's state and `history`, so a resumed stage ends bit-exactly and plots it all

The stage reads `extracted` and `history` off the callback it made; nothing travels on the module. `on_fit_end`
runs whether or not the fit trained (0 epochs for one-shot methods, a resumed fit already finished), after
Lightning moved the module back, so the method follows it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl
import torch

from umec_lightning.compression.method import CompressionMethod, Extracted, finish_and_extract, finish_on_rank_zero
from umec_lightning.io import write_json
from umec_lightning.models import measure
from umec_lightning.module import first_val_batches
from umec_lightning.report.sparsity_figures import plot_feature_scores, plot_sparsity

log = logging.getLogger(__name__)


class Compression(pl.Callback):
    """`every_n_steps`: how often the method's values are logged; `record_dir`: where the history, its figures and
    the per-process extraction record go (None: nowhere); `suffix`: of those files' names (a run with two compress
    stages); `holdout_batches`: how many validation batches `set_holdout`'s callable returns."""

    def __init__(self, method: CompressionMethod, every_n_steps: int = 50, record_dir: str | Path | None = None,
                 suffix: str = "", holdout_batches: int = 3):
        self.method = method
        self.every_n_steps = max(1, int(every_n_steps))
        self.record_dir = Path(record_dir) if record_dir is not None else None
        self.suffix = suffix
        self.holdout_batches = holdout_batches
        self.history: list[dict] = []  # the logged values, one record per logged step
        self.extracted: Extracted | None = None  # set when the fit ends
        self._device: torch.device | None = None

    # ---- the hooks the module's manual-optimization step calls ------------------------------------------
    def loss(self, model) -> torch.Tensor | None:
        """An extra term of the training loss (group lasso), or None."""
        return self.method.loss(model)

    def after_backward(self, model) -> None:
        self.method.after_backward(model)

    def after_step(self, model, lr: float) -> None:
        self.method.after_step(model, lr)

    def dual_values(self) -> dict[str, float]:
        """The method's dual variables as last logged (y/..., z/...), for a NaN's error message."""
        return {k: v for k, v in self.method.log_values().items() if k.startswith(("y/", "z/"))}

    # ---- Lightning's hooks ----------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        # The strategy has placed the model now (and a checkpoint may have been restored on CPU before).
        self._device = pl_module.device
        self.method.to(self._device)

    def on_train_start(self, trainer, pl_module) -> None:
        method = self.method
        method.begin(int(trainer.estimated_stepping_batches))
        method.set_holdout(lambda count=self.holdout_batches: _holdout(trainer, pl_module.device, count))
        method.set_optimizer(pl_module.optimizers().optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if (step - 1) % self.every_n_steps and not _last_step(trainer):
            return
        values = self._record(step, pl_module.last_loss)
        if values:
            pl_module.log_dict({f"{pl_module.phase}/{k}": v for k, v in values.items()}, on_step=True,
                               on_epoch=False)

    def on_train_end(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if step > 0 and (not self.history or self.history[-1]["step"] < step):
            # The loop ended on a step `_last_step` did not foresee: the history still ends where training did.
            self._record(step, pl_module.last_loss)
        if self.record_dir is None or not trainer.is_global_zero or not self.history:
            return
        budgets = dict(getattr(self.method, "budgets", {}))
        write_json(self.record_dir / f"sparsity_history{self.suffix}.json",
                   {"budgets": budgets, "history": self.history})
        plot_sparsity(self.history, budgets, self.record_dir, self.suffix)
        meta = getattr(getattr(trainer, "datamodule", None), "meta", None)
        plot_feature_scores(self.history, self.record_dir, self.suffix, getattr(meta, "noise_features", None))

    def on_fit_end(self, trainer, pl_module) -> None:
        self.extracted = self._extract(trainer, pl_module.model)
        if self.record_dir is not None:
            self._write_record(trainer, self.extracted)

    def state_dict(self) -> dict:
        return {"method": self.method.state_dict(), "history": list(self.history)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.method.load_state_dict(state_dict["method"])
        self.history = list(state_dict.get("history", []))
        if self._device is not None:  # restored after the fit started (a strategy that restores late)
            self.method.to(self._device)

    # ---- the parts ------------------------------------------------------------------------------------
    def _record(self, step: int, loss: float | None) -> dict:
        values = self.method.log_values()
        if not values:
            return values
        if loss is not None:
            values["loss"] = loss
        # Which inputs are pruned right now, by name: shows the order in which features go.
        self.history.append({"step": step, **values, "pruned_features": self.method.pruned_features()})
        return values

    def _extract(self, trainer, model) -> Extracted:
        method = self.method
        broadcast = (lambda obj: trainer.strategy.broadcast(obj, src=0)) if trainer.world_size > 1 else None
        if broadcast is not None and getattr(trainer.strategy, "shards_tables", False):
            # trainer=torchrec: only rank 0 holds the tables of record, so it alone calibrates (on every rank's
            # batches), decides and extracts; the others get the model without its tables.
            world = trainer.world_size
            calibration = trainer.datamodule.global_train_batches(world) if method.calibration_batches else None
            result = finish_on_rank_zero(method, model, trainer.global_rank, broadcast, calibration)
        else:
            # Under DDP rank 0 decides the structure and every rank extracts that one: identical models by
            # construction, whatever each rank's arithmetic did.
            calibration = _train_batches(trainer) if method.calibration_batches else None
            result = finish_and_extract(method, model, agree=broadcast, calibration=calibration)
        if result.local_kept != result.kept:
            log.warning("rank %d decided another structure than rank 0; using rank 0's", trainer.global_rank)
        for key, value in result.info.items():
            if key.startswith(("extra_", "groups_")) and value:
                log.info("%s = %s", key, value)
        return result

    def _write_record(self, trainer, result: Extracted) -> None:
        cost = measure(result.model)
        tables = {id(g.weight) for g in result.model.sparse.groups}
        params = list(result.model.parameters())
        record = {"rank": trainer.global_rank, "kept": result.local_kept.to_dict(),
                  "flops": cost.flops, "params": cost.params,
                  # Under DDP every rank must have trained the same weights (tables included); under torchrec
                  # only rank 0 holds the tables (`holds_tables`), every rank the rest.
                  "holds_tables": result.model.holds_tables,
                  "dense_weight_sum": float(sum(p.detach().double().abs().sum() for p in params
                                                if id(p) not in tables))}
        if result.model.holds_tables:
            record["weight_sum"] = float(sum(p.detach().double().abs().sum() for p in params))
        state = self.method.state_vector()
        if state is not None:
            record["state"] = state
        name = "kept.json" if trainer.world_size == 1 else f"kept_rank{trainer.global_rank}.json"
        write_json(self.record_dir / name, record)


def _holdout(trainer, device, count: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The first `count` validation batches of this process on `device` ([] without a datamodule)."""
    datamodule = getattr(trainer, "datamodule", None)
    return [] if datamodule is None else first_val_batches(datamodule, device, count)


def _train_batches(trainer):
    """The training batches of the fit, anew: the datamodule's (the run's), else the loader `fit` was given."""
    datamodule = getattr(trainer, "datamodule", None)
    return datamodule.train_dataloader() if datamodule is not None else trainer.train_dataloader


def _last_step(trainer) -> bool:
    """Whether the step that just ended is the fit's last: `max_steps` reached, or the last batch of the last
    epoch."""
    if trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return True
    epochs = trainer.max_epochs
    return bool(trainer.is_last_batch) and epochs is not None and epochs > 0 and trainer.current_epoch + 1 >= epochs
