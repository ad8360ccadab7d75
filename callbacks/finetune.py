"""The finetune phase: checks that it trains the extracted (physically smaller) model, without a method or gates.
Its best-on-validation weights are loaded once, by `stages.training.fit_phase`, as for every stage that selects on
validation (the run then saves `compressed.pt` from the module)."""

from __future__ import annotations

import logging

import pytorch_lightning as pl

from umec_lightning.models import measure

log = logging.getLogger(__name__)


class Finetune(pl.Callback):
    def on_fit_start(self, trainer, pl_module) -> None:
        if pl_module.model.dim_gate is not None or pl_module.compression is not None:
            raise RuntimeError("the finetune phase must train the extracted model, without a method or gates")
        cost = measure(pl_module.model)
        log.info("finetuning the extracted model: %d FLOPs/sample, %d params", cost.flops, cost.params)
