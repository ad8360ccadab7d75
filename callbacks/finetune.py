"""The finetune phase: trains the extracted (physically smaller) model, keeps the best-on-validation
weights, and writes `compressed.pt` from them."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl

from umec_lightning.compressed import save_compressed
from umec_lightning.models import measure

log = logging.getLogger(__name__)


class Finetune(pl.Callback):
    def __init__(self, kept, path: str | Path, extra: dict | None = None):
        self.kept = kept
        self.path = Path(path)
        self.extra = dict(extra or {})

    def on_fit_start(self, trainer, pl_module) -> None:
        if pl_module.model.dim_gate is not None or pl_module.compression is not None:
            raise RuntimeError("the finetune phase must train the extracted model, without ADMM or gates")
        cost = measure(pl_module.model)
        log.info("finetuning the extracted model: %d FLOPs/sample, %d params", cost.flops, cost.params)

    def on_fit_end(self, trainer, pl_module) -> None:
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and ckpt.best_model_path:
            pl_module.load_weights(ckpt.best_model_path)
        if trainer.is_global_zero:
            save_compressed(self.path, pl_module.model, self.kept, self.extra)
