"""Pruning extraction: when a compress stage's fit ends, make its result permanent as a physically smaller
DLRM (smaller Linear layers, dropped and narrowed tables, dead interaction terms removed).

Like Lightning's `ModelPruning`, the callback acts on the module it is given and keeps nothing itself: the
result (`compression.method.Extracted`) is set as `pl_module.extracted`. The work is the plain function
`finish_and_extract`; `on_fit_end` runs whether or not the fit trained (0 epochs for one-shot methods, or a
resumed fit that was already finished), and after Lightning moved the module back, so the method follows it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl

from umec_lightning.compression.method import finish_and_extract, finish_on_rank_zero
from umec_lightning.io import write_json
from umec_lightning.models import measure

log = logging.getLogger(__name__)


class PruningExtraction(pl.Callback):
    """`record_dir`: where each process writes what it decided on its own (`kept.json`, or
    `kept_rank<r>.json` under DDP) — a diagnostic record, never read back by the run."""

    def __init__(self, record_dir: str | Path | None = None):
        self.record_dir = Path(record_dir) if record_dir is not None else None

    def on_fit_end(self, trainer, pl_module) -> None:
        method = pl_module.compression
        broadcast = (lambda obj: trainer.strategy.broadcast(obj, src=0)) if trainer.world_size > 1 else None
        if broadcast is not None and getattr(trainer.strategy, "shards_tables", False):
            # trainer=torchrec: only rank 0 holds the tables of record, so it alone calibrates (on every rank's
            # batches), decides and extracts; the others get the model without its tables.
            world = trainer.world_size
            calibration = trainer.datamodule.global_train_batches(world) if method.calibration_batches else None
            result = finish_on_rank_zero(method, pl_module.model, trainer.global_rank, broadcast, calibration)
        else:
            # Under DDP rank 0 decides the structure and every rank extracts that one: identical models by
            # construction, whatever each rank's arithmetic did.
            calibration = trainer.datamodule.train_dataloader() if method.calibration_batches else None
            result = finish_and_extract(method, pl_module.model, agree=broadcast, calibration=calibration)
        if result.local_kept != result.kept:
            log.warning("rank %d decided another structure than rank 0; using rank 0's", trainer.global_rank)
        for key, value in result.info.items():
            if key.startswith(("extra_", "groups_")) and value:
                log.info("%s: %s = %s", pl_module.phase, key, value)
        pl_module.extracted = result
        if self.record_dir is not None:
            cost = measure(result.model)
            tables = {id(g.weight) for g in result.model.sparse.groups}
            params = list(result.model.parameters())
            record = {"rank": trainer.global_rank, "kept": result.local_kept.to_dict(),
                      "flops": cost.flops, "params": cost.params,
                      # Under DDP every rank must have trained the same weights (tables included); under
                      # torchrec only rank 0 holds the tables (`holds_tables`), every rank the rest.
                      "holds_tables": result.model.holds_tables,
                      "dense_weight_sum": float(sum(p.detach().double().abs().sum() for p in params
                                                    if id(p) not in tables))}
            if result.model.holds_tables:
                record["weight_sum"] = float(sum(p.detach().double().abs().sum() for p in params))
            if hasattr(method, "state_vector"):
                record["state"] = method.state_vector()
            name = "kept.json" if trainer.world_size == 1 else f"kept_rank{trainer.global_rank}.json"
            write_json(self.record_dir / name, record)
