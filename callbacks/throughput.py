"""Wall-clock training throughput: samples per second over the training loop, data loading included,
validation excluded (`samples_per_second`), and on a CUDA device the fit's peak allocated memory of this process
(`peak_memory_bytes`): the stage that made the callback reads them off it when the fit ends."""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch


class Throughput(pl.Callback):
    def __init__(self) -> None:
        self.samples = 0
        self.seconds = 0.0
        self.fit_seconds = 0.0
        self._t0: float | None = None
        self.peak_memory_bytes: int | None = None

    def _pause(self) -> None:
        if self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None

    def _resume(self) -> None:
        self._t0 = time.perf_counter()

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_t0 = time.perf_counter()
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_end(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":  # before teardown moves the module back to the host
            self.peak_memory_bytes = int(torch.cuda.max_memory_allocated(pl_module.device))

    def on_fit_end(self, trainer, pl_module) -> None:
        self.fit_seconds = time.perf_counter() - self._fit_t0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._resume()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._pause()

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self._pause()

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._resume()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.samples += int(batch.label.shape[0]) * trainer.world_size

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0
