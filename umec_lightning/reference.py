"""The dense reference of compression runs, trained once and shared (`reference.dir`).

A compression run's pretrain stage normally trains its own dense model for `phases.pretrain_epochs`. With
`reference.dir` set, it asks the shared reference instead: one dense run per key

    (data and its cache fingerprint, model, seed, optimizer, loader, evaluation, trainer precision/limits,
     phases.pretrain_epochs, early stopping)

under `<reference.dir>/<key>/`, trained by whichever run needs it first while holding a file lock (sweep
members running at the same time wait for it instead of training it twice). That run trains the dense model
for the *total* epochs T of the compressed run (the sum of its stages' epochs, as `mode=dense_control`) and

- keeps, besides its best-on-validation checkpoint, the best one of the first `pretrain_epochs`
  (`checkpoints/dense/pretrain-best.ckpt`): the weights every compression run with this key starts from,
  exactly what its own pretrain stage would have handed on;
- evaluates the best over all T epochs: the **equal-epochs control**, recorded per T in `reference.json`
  (summary.json: `dense_same_epochs_*` beside the pretrain point's `dense_*`).

A run with a longer T (cascaded has one more compress stage) continues the same dense run from its epoch-end
checkpoint to its T (resuming is exact, so that is the T-epoch run); a shorter T that no run recorded yet is
trained on its own in `control-<T>/`. `reference.json` is written last (atomically): a directory without it is
unfinished and is resumed from its epoch-end checkpoint by the next run that takes the lock.

**Early stopping** (`phases.early_stopping.patience` set, part of the key): the dense run trains under the same
stopping rule as the compressed run's pretrain and finetune stages, so T is a maximum, and the control is the
dense model trained *until its validation stopped improving*, at most T epochs: not an equal-epochs model.
Each control records what it really trained (`epochs_run`, `stopped_early`, the rule `early_stopping`); once the
run has stopped early after e epochs, every T >= e has that same model, which is then recorded for T without
training (`same_model_as`: the T it was trained for) instead of being presented as a T-epoch model.

Every control's per-row test predictions are kept as `test_predictions_<T>ep.npz` (`umec_lightning/predictions.py`;
summary.json: `dense_same_epochs_test_predictions`), for the report's paired tests on the same test rows.

Multi-process (DDP) runs do not share: every rank would have to take the same decision before the process
group exists; they pretrain in their run dir.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import random
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint

from .config import flat_config, result_neutral
from .io import write_json
from .locks import exclusive

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# The config that decides what the dense run computes (besides the data's fingerprint and the structure), less the
# keys that change no result (`config.RESULT_NEUTRAL_KEYS`, e.g. eval.test_predictions).
_KEY_PREFIXES = ("data.", "model.", "optim.", "eval.", "phases.early_stopping.", "phases.lr_decay.",
                 "regularization.", "loader.limit_rows.")
_KEY_EXACT = ("seed", "loader.batch_size", "loader.eval_batch_size", "loader.limit_rows", "phases.pretrain_epochs",
              "trainer.precision", "trainer.deterministic", "trainer.limit_train_batches",
              "trainer.limit_val_batches", "trainer.limit_test_batches", "trainer.accelerator")


def total_epochs(stages) -> int:
    """The epochs a compressed run trains in all (a compress stage run for `steps` counts as its `epochs`):
    what its equal-epochs control trains."""
    return sum(int(stage.epochs) for stage in stages)


def reference_material(cfg: DictConfig, fingerprint: str, structure: dict) -> dict:
    """Everything the key hashes, as plain JSON (also written to reference.json, for a reader)."""
    flat = flat_config(cfg)
    chosen = {k: v for k, v in flat.items()
              if (k in _KEY_EXACT or k.startswith(_KEY_PREFIXES)) and not result_neutral(k)}
    return {"version": FORMAT_VERSION, "cache_fingerprint": fingerprint, "structure": structure,
            "config": dict(sorted(chosen.items()))}


def reference_key(material: dict) -> str:
    blob = json.dumps(material, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def distributed_run(cfg: DictConfig) -> bool:
    """More than one process trains this run (DDP): then nothing is shared."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return True
    devices = cfg.trainer.get("devices", 1)  # any strategy over several devices or nodes runs several processes
    many = (isinstance(devices, int) and devices > 1) or (not isinstance(devices, (int, str)) and len(devices) > 1)
    return bool(many) or int(cfg.trainer.get("num_nodes", 1) or 1) > 1


class PretrainPoint(ModelCheckpoint):
    """The best-on-validation checkpoint of the first `until` epochs only (`pretrain-best.ckpt`): the
    pretrain point inside a longer dense run. Its state key differs from the run's other best checkpoint
    on the same monitor, so both restore from one Lightning checkpoint."""

    def __init__(self, dirpath: str, monitor: str, until: int, mode: str = "max"):
        super().__init__(dirpath=dirpath, filename="pretrain-best", monitor=monitor, mode=mode, save_top_k=1,
                         enable_version_counter=False)
        self.until = int(until)

    @property
    def state_key(self) -> str:
        return f"PretrainPoint[{self.until}]{super().state_key}"

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch < self.until:
            super().on_validation_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch < self.until:
            super().on_train_epoch_end(trainer, pl_module)


class DenseReference:
    """The shared dense run of one key: `ensure()` trains it if needed, then its pretrain point and its
    equal-epochs control are read from `<root>/<key>/`."""

    def __init__(self, root: str | Path, cfg: DictConfig, fingerprint: str, structure: dict, epochs: int):
        self.epochs = int(epochs)  # T, the equal-epochs control this run needs
        self.material = reference_material(cfg, fingerprint, structure)
        self.key = reference_key(self.material)
        self.root = Path(root)
        self.dir = self.root / self.key
        self.cfg = cfg

    @property
    def record_path(self) -> Path:
        return self.dir / "reference.json"

    @property
    def pretrain_checkpoint(self) -> Path:
        return self.dir / "checkpoints" / "dense" / "pretrain-best.ckpt"

    def record(self) -> dict | None:
        """reference.json when the dense run finished (and is for this key), else None."""
        if not self.record_path.exists():
            return None
        record = json.loads(self.record_path.read_text())
        if record.get("material") != json.loads(json.dumps(self.material, default=str)):
            raise RuntimeError(f"{self.record_path} was written for another config than its key {self.key} says "
                               "(a hash collision or an edited file): remove that directory")
        return record

    @contextmanager
    def _lock(self):
        """Held while this run reads or trains the reference: released when the block ends, also if this process
        dies (an OS lock, `locks.exclusive`)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with exclusive(self.root / f"{self.key}.lock",
                       waiting=f"dense reference {self.key}: another run holds its lock: waiting for it"):
            yield

    def ensure(self, ctx, model) -> dict:
        """The record with this run's control (`same_epochs[str(T)]`), training what is missing first, from
        `model`'s initial weights (which it does not touch). The caller's RNG state is left as it found it,
        so what follows does not depend on whether this run trained the reference or read it."""
        T = str(self.epochs)
        with self._lock():
            record = self.record()
            if record is not None and T in record["same_epochs"]:
                log.info("dense reference %s: reusing %s", self.key, self.dir)
                return record
            stopped = stopped_within(record, self.epochs)
            if stopped is not None:  # early stopping ended the dense run before T: the T-epoch run is that run
                log.info("dense reference %s: its dense run stopped early after %d epochs, so its control for %s "
                         "epochs is the one recorded for %s", self.key, stopped[1]["epochs_run"], T, stopped[0])
                same = {**stopped[1], "epochs": self.epochs, "same_model_as": stopped[0]}
                record = {**record, "same_epochs": {**record["same_epochs"], T: same}}
                write_json(self.record_path, record)
                return record
            with _rng_kept():
                if record is None or record["epochs_trained"] < self.epochs:
                    log.info("dense reference %s: training it in %s to %d epochs (the pretrain point after %d)",
                             self.key, self.dir, self.epochs, int(self.cfg.phases.pretrain_epochs))
                    if record is not None:  # continue the finished run from its epoch-end checkpoint
                        (self.dir / "phases" / "dense.json").unlink(missing_ok=True)
                    figures = self._train(ctx, copy.deepcopy(model), self.dir, point=True)
                    trained = self.epochs
                else:  # a shorter control than the run went to: on its own, from the same initial weights
                    log.info("dense reference %s: training its %d-epoch control in %s", self.key, self.epochs,
                             self.dir / f"control-{T}")
                    figures = self._train(ctx, copy.deepcopy(model), self.dir / f"control-{T}", point=False)
                    trained = record["epochs_trained"]
            previous = {} if record is None else record["same_epochs"]
            record = {"key": self.key, "material": json.loads(json.dumps(self.material, default=str)),
                      "pretrain_checkpoint": str(self.pretrain_checkpoint), "epochs_trained": trained,
                      "same_epochs": {**previous, T: {"epochs": self.epochs, **figures}}}
            write_json(self.record_path, record)
            return record

    def _train(self, ctx, model, run_dir: Path, point: bool) -> dict:
        from .config import early_stopping_config
        from .stages import RunContext, Stage, make_module, train_and_evaluate

        cfg = OmegaConf.create(OmegaConf.to_container(self.cfg, resolve=True))
        cfg.resume = True  # an unfinished reference continues from its epoch-end checkpoint
        cfg.debug.interrupt = None
        ref_ctx = RunContext(cfg=cfg, run_dir=run_dir, datamodule=ctx.datamodule, loggers=[])
        module = make_module(ref_ctx, model, "dense")
        stage = Stage("pretrain", "dense", self.epochs, early_stopping=early_stopping_config(cfg))
        callbacks = []
        if point:
            callbacks.append(PretrainPoint(str(ref_ctx.checkpoint_dir("dense")), module.val_monitor,
                                           int(cfg.phases.pretrain_epochs), module.monitor_mode))
        figures = train_and_evaluate(ref_ctx, module, stage, callbacks)
        if point and not self.pretrain_checkpoint.exists():
            raise RuntimeError(f"dense reference {self.key}: no pretrain-point checkpoint was written "
                               f"({self.pretrain_checkpoint}); phases.pretrain_epochs must be >= 1")
        if "test_predictions" in figures:  # one file per control: a longer T continues this run and rewrites it
            kept = self.dir / f"test_predictions_{self.epochs}ep.npz"
            os.replace(figures["test_predictions"], kept)
            figures["test_predictions"] = str(kept.resolve())
        return {k: v for k, v in figures.items() if k.startswith(("val_", "test_"))} \
            | {k: figures[k] for k in ("epochs_run", "stopped_early", "steps") if k in figures} \
            | {"early_stopping": stage.early_stopping}


def stopped_within(record: dict | None, epochs: int) -> tuple[str, dict] | None:
    """A recorded control whose dense run stopped early after at most `epochs` epochs, as (its T, its figures):
    under the same stopping rule a run allowed `epochs` epochs stops at the same check with the same model."""
    if record is None:
        return None
    for T, figures in sorted(record["same_epochs"].items(), key=lambda item: int(item[0])):
        run = figures.get("epochs_run")
        if figures.get("stopped_early") and isinstance(run, int) and run <= epochs and "same_model_as" not in figures:
            return T, figures
    return None


@contextmanager
def _rng_kept():
    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


def shared_reference(cfg: DictConfig, stages, fingerprint: str, structure) -> DenseReference | None:
    """The run's shared reference, or None: `reference.dir` unset, a dense-only mode, a `pretrained=`
    checkpoint given, no pretrain epochs, or a multi-process run."""
    node = cfg.get("reference") or {}
    root = node.get("dir")
    if not root or len(stages) < 2 or cfg.pretrained:
        return None
    if int(cfg.phases.pretrain_epochs) < 1 or stages[0].epochs != int(cfg.phases.pretrain_epochs):
        log.info("reference.dir is set, but the pretrain stage does not train phases.pretrain_epochs >= 1 "
                 "epochs: this run pretrains on its own")
        return None
    if distributed_run(cfg):
        log.info("reference.dir is set, but this is a multi-process run: it pretrains on its own (no sharing)")
        return None
    return DenseReference(root, cfg, fingerprint, structure.to_dict(), total_epochs(stages))
