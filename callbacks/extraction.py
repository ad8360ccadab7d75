"""Pruning extraction: at the end of the ADMM fit, turn the learned structure into a physically smaller
DLRM (smaller Linear layers, dropped and narrowed tables, dead interaction terms removed)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytorch_lightning as pl

from umec_lightning.compression.extract import extract
from umec_lightning.io import write_json
from umec_lightning.models import measure

log = logging.getLogger(__name__)


class PruningExtraction(pl.Callback):
    """After ADMM: hard-prune the ceil(s_l) smallest groups of every set (plus, if ADMM ended over a budget,
    the fewest extra groups that meet it), extract, and measure the extracted model.

    Results (on every rank, identical): `kept`, `extracted` (the slim DLRM), `cost` (measured on it),
    `extra_groups` (groups pruned beyond ADMM's own to meet the budget).
    """

    def __init__(self, out_dir: str | Path | None = None, enforce_budget: bool = True):
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.enforce_budget = enforce_budget
        self.kept = None
        self.extracted = None
        self.cost = None
        self.extra_groups = 0
        self.restored_groups = 0

    def on_train_end(self, trainer, pl_module) -> None:
        umec = pl_module.compression
        # Each rank's own result first: `kept_rank<r>.json` shows whether the ranks agreed by themselves.
        local_state = [float(v) for v in umec.state.flat().tolist()]
        masks, self.extra_groups = umec.final_pruned_masks(enforce_budget=self.enforce_budget)
        local_kept = umec.kept(masks)
        if trainer.world_size > 1:
            # Identical on every rank by construction (same all-reduced gradients, same arithmetic);
            # taking rank 0's state makes that a guarantee rather than an expectation.
            flat = trainer.strategy.broadcast(umec.state.flat().cpu(), src=0).to(umec.state.s.device)
            drift = float((flat - umec.state.flat()).abs().max())
            if drift > 0:
                log.warning("rank %d ADMM state differed from rank 0's by %.3g; using rank 0's",
                            trainer.global_rank, drift)
                umec.state.load_flat_(flat)
                masks, self.extra_groups = umec.final_pruned_masks(enforce_budget=self.enforce_budget)
        self.restored_groups = getattr(umec, "restored_groups", 0)
        if self.restored_groups:
            log.info("ADMM ended under budget: %d pruned groups restored at extraction (still within %s)",
                     self.restored_groups, umec.budgets)
        if self.extra_groups:
            log.warning("ADMM ended over budget: %d extra groups pruned at extraction to meet %s",
                        self.extra_groups, umec.budgets)
        self.kept = umec.kept(masks)
        self.extracted = extract(pl_module.model, self.kept)
        self.cost = measure(self.extracted)
        if self.out_dir is not None:
            record = {"rank": trainer.global_rank, "kept": local_kept.to_dict(), "state": local_state,
                      "flops": self.cost.flops, "params": self.cost.params}
            name = "kept.json" if trainer.world_size == 1 else f"kept_rank{trainer.global_rank}.json"
            write_json(self.out_dir / name, record)
