"""Learning-rate decay on a validation plateau (FuxiCTR's `reduce_lr_on_plateau`): after `patience`
validation checks in a row without an improvement of the monitored metric by more than `min_delta`, every
learning rate of the optimizer is multiplied by `factor` (never below `min_lr`) and training continues.
Beside early stopping (`phases.early_stopping`), which ends a stage after its own patience; with FuxiCTR's
settings (patience 1 here, 2 there) the rate drops at the first flat check and the stage ends at the second.

Its state (best value, checks without improvement, the decays so far) is checkpointed with the stage, and the
optimizer's state holds the rates themselves, so a resumed stage continues with the decayed rate.
"""

from __future__ import annotations

import logging
import math

import pytorch_lightning as pl

log = logging.getLogger(__name__)


class PlateauDecay(pl.Callback):
    def __init__(self, monitor: str, mode: str, factor: float, patience: int = 1, min_delta: float = 0.0,
                 min_lr: float = 0.0):
        if not 0 < factor < 1:
            raise ValueError(f"config key `phases.lr_decay.factor` must lie in (0, 1), got {factor!r}")
        self.monitor, self.mode = monitor, mode
        self.factor, self.patience, self.min_delta, self.min_lr = factor, patience, min_delta, min_lr
        self.best = -math.inf if mode == "max" else math.inf
        self.waiting = 0
        self.decays: list[dict] = []  # {step, lr} of every decay, for the stage's figures

    @property
    def state_key(self) -> str:
        return f"PlateauDecay[{self.monitor}]"

    def _improved(self, value: float) -> bool:
        if self.mode == "max":
            return value > self.best + self.min_delta
        return value < self.best - self.min_delta

    def on_validation_end(self, trainer, pl_module) -> None:
        # Only while fitting: the stage's final `trainer.validate` must not decay anything.
        if trainer.sanity_checking or trainer.state.fn != "fit" or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if self._improved(value):
            self.best, self.waiting = value, 0
            return
        self.waiting += 1
        if self.waiting < self.patience:
            return
        self.waiting = 0
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = max(group["lr"] * self.factor, self.min_lr)
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        self.decays.append({"step": int(trainer.global_step), "lr": lr})
        log.info("%s: no improvement of %s, learning rate -> %.3g", pl_module.phase, self.monitor, lr)

    def state_dict(self) -> dict:
        return {"best": self.best, "waiting": self.waiting, "decays": list(self.decays)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = float(state_dict["best"])
        self.waiting = int(state_dict["waiting"])
        self.decays = list(state_dict.get("decays", []))
