"""Simulated preemption, for testing resume: stops the run at the start of a given epoch of a phase,
as a killed job would, after the previous epoch's checkpoint was written."""

from __future__ import annotations

import pytorch_lightning as pl


class SimulatedInterruption(RuntimeError):
    pass


class InterruptAt(pl.Callback):
    def __init__(self, phase: str, epoch: int):
        self.phase, self.epoch = phase, int(epoch)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if pl_module.phase == self.phase and trainer.current_epoch == self.epoch:
            raise SimulatedInterruption(f"simulated interruption at {self.phase} epoch {self.epoch}")
