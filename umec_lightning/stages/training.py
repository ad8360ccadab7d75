"""Trainers and fits of a stage: the run's context, `make_trainer` / `make_module`, `fit_phase` (one
`Trainer.fit`, resumable), `evaluate` (val/test metrics, per-row test predictions).

Training length: with `phases.early_stopping.patience` set, pretrain and finetune stages stop once their validation
metric has not improved by `min_delta` for `patience` validation checks (`eval.val_check_interval` 0.5: two per
epoch); their epochs are then the maximum. Every fit reports `epochs_run`, those that can stop early `stopped_early`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

from ..callbacks.interrupt import InterruptAt
from ..callbacks.plateau import PlateauDecay
from ..callbacks.throughput import Throughput
from ..checkpoint_io import AtomicCheckpointIO, discard_previous, resume_point
from ..compression.method import model_device
from ..config import ConfigError, lr_decay_config, regularization_config
from ..data import CTRDataModule
from ..loggers import RunCSVLogger
from ..metrics import LogLoss, ctr_metrics
from ..models import DLRM
from ..module import CTRModule, NonFiniteLossError, first_val_batches
from ..predictions import save_test_predictions, split_logits
from ..run_dir import launched_rank_zero
from .optimizer import optimizer_factory


@dataclass
class RunContext:
    cfg: DictConfig
    run_dir: Path
    datamodule: CTRDataModule
    loggers: list = field(default_factory=list)
    reference: object | None = None  # reference.DenseReference: the shared dense run (`reference.dir`), or None
    # trainer=torchrec: {phase: what its sharding plan put on each rank} (sharded.strategy.table_memory)
    sharded_tables: dict = field(default_factory=dict)

    def phase_marker(self, phase: str) -> Path:
        return self.run_dir / "phases" / f"{phase}.json"

    def checkpoint_dir(self, phase: str) -> Path:
        return self.run_dir / "checkpoints" / phase

    def finished(self, phase: str) -> dict | None:
        """The marker of a finished phase when resuming, else None."""
        marker = self.phase_marker(phase)
        if self.cfg.resume and marker.exists():
            return json.loads(marker.read_text())
        return None

    def resume_point(self, phase: str) -> tuple[Path, int] | None:
        """When resuming: the phase's epoch-end checkpoint (or the previous one, if that one is damaged) and its
        step (`checkpoint_io.resume_point`); else None."""
        if not self.cfg.resume:
            return None
        return resume_point(self.checkpoint_dir(phase), rank_zero=launched_rank_zero())


class StageEarlyStopping(EarlyStopping):
    """Lightning's EarlyStopping on the phase's validation AUC (mode max, checked after every validation),
    which remembers in its checkpointed state that it stopped: resumed from the epoch-end checkpoint written
    after the stop, the stage ends there again instead of training on."""

    def __init__(self, monitor: str, patience: int, min_delta: float, mode: str = "max"):
        super().__init__(monitor=monitor, mode=mode, patience=patience, min_delta=min_delta,
                         check_on_train_epoch_end=False, strict=True)
        self.stopped = False

    def on_train_start(self, trainer, pl_module) -> None:
        if self.stopped:
            trainer.should_stop = True

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.should_stop:  # only this callback stops a stage
            self.stopped = True

    def state_dict(self) -> dict:
        return {**super().state_dict(), "stopped": self.stopped}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.stopped = bool(state_dict.get("stopped", False))


# Keys of `trainer` that are not Trainer arguments: how `make_strategy` shards the tables under trainer=torchrec.
STRATEGY_KEYS = ("sharding", "process_group_backend")


def make_strategy(t: DictConfig, record: dict | None = None):
    """`trainer.strategy` for pl.Trainer: its name, or for `torchrec` the strategy that shards the tables
    (umec_lightning/sharded/strategy.py) under `trainer.sharding`, recording each phase's shards in `record`."""
    if t.strategy != "torchrec":
        return t.strategy
    from ..sharded.strategy import TorchrecStrategy

    sharding = t.get("sharding")
    if isinstance(sharding, DictConfig):
        sharding = OmegaConf.to_container(sharding, resolve=True)
    return TorchrecStrategy(sharding=sharding, record=record, process_group_backend=t.get("process_group_backend"))


def make_trainer(ctx: RunContext, module: CTRModule, epochs: int, callbacks: list, select_on_val: bool,
                 max_steps: int | None = None) -> pl.Trainer:
    t = ctx.cfg.trainer
    ckpt_dir = str(ctx.checkpoint_dir(module.phase))
    # `epoch-end` is the resume point (exact: data order is a function of seed and epoch);
    # `best` (validation AUC) is what the phase hands on.
    checkpoints = [ModelCheckpoint(dirpath=ckpt_dir, filename="epoch-end", save_on_train_epoch_end=True,
                                   enable_version_counter=False)]
    if select_on_val:
        checkpoints.insert(0, ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=module.val_monitor,
                                              mode=module.monitor_mode, save_top_k=1, enable_version_counter=False))
    # The config's own Trainer arguments (`trainer`, a `_target_` node: any Trainer argument can be added there),
    # then what the stage decides: these win.
    configured = instantiate(OmegaConf.masked_copy(t, [k for k in t if k not in STRATEGY_KEYS]), _partial_=True,
                             _convert_="all")
    return configured(
        strategy=make_strategy(t, ctx.sharded_tables),
        # A step count replaces the epochs (a last epoch may be partial; `epoch-end.ckpt` is then written
        # where the steps end).
        max_epochs=epochs if max_steps is None else (0 if max_steps == 0 else -1),
        max_steps=-1 if max_steps is None else max_steps,
        val_check_interval=ctx.cfg.eval.val_check_interval if select_on_val else 1.0,
        enable_model_summary=False,
        logger=ctx.loggers or False,
        callbacks=[*checkpoints, *callbacks, *configured_callbacks(ctx.cfg)],
        # Every checkpoint written atomically (a full disk leaves the old one), the previous epoch-end kept.
        plugins=[AtomicCheckpointIO()],
        log_every_n_steps=ctx.cfg.log_every_n_steps,
        num_sanity_val_steps=0,
        # The datamodule shards whole batches across ranks itself.
        use_distributed_sampler=False,
        default_root_dir=str(ctx.run_dir),
    )


def configured_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The config's own callbacks (`callbacks.<name>`: a `_target_` node, null = off), new ones for each Trainer."""
    out = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        try:
            callback = instantiate(node)
        except Exception as err:  # noqa: BLE001 - Hydra wraps every lookup or constructor error the same way
            cause = err.__cause__ or err
            raise ConfigError(f"config key `callbacks.{name}`: {' '.join(str(cause).split())}") from None
        if not isinstance(callback, pl.Callback):
            raise ConfigError(f"config key `callbacks.{name}._target_`: {type(callback).__name__} is not a Lightning "
                              "Callback")
        out.append(callback)
    return out


def make_module(ctx: RunContext, model: DLRM, phase: str, compression=None) -> CTRModule:
    cfg = ctx.cfg
    return CTRModule(model, lr=cfg.optim.lr, phase=phase, compression=compression,
                     auroc_bins=cfg.eval.auroc_bins, log_every_n_steps=cfg.log_every_n_steps,
                     optimizer=optimizer_factory(cfg), nan_check_every=cfg.get("nan_check_every"),
                     **regularization_config(cfg))


def evaluate(trainer: pl.Trainer, module: CTRModule, ctx: RunContext, splits=("val", "test")) -> dict:
    """<split>_* metrics of `module` as it is, for each of `splits` (val, test)."""
    out = {}
    for split in splits:
        run_eval = trainer.validate if split == "val" else trainer.test
        (metrics,) = run_eval(module, datamodule=ctx.datamodule, verbose=False)
        prefix = f"{module.phase}/{split}/"
        out.update({f"{split}_{k[len(prefix):]}": float(v) for k, v in metrics.items() if k.startswith(prefix)})
    if "test" in splits and trainer.is_global_zero and module.model.holds_tables:
        out.update(_test_predictions(ctx, module.model, module.phase))
    return out


def _test_predictions(ctx: RunContext, model: DLRM, phase: str) -> dict:
    """{"test_predictions": path} of the per-row test predictions written for the report's paired tests on the same
    rows (umec_lightning/predictions.py), or {} with `eval.test_predictions` off."""
    if not ctx.cfg.eval.get("test_predictions", True):
        return {}
    path = ctx.run_dir / f"test_predictions_{phase}.npz"
    limit = ctx.cfg.trainer.get("limit_test_batches")
    return {"test_predictions": str(save_test_predictions(path, model, ctx.datamodule, limit).resolve())}


def fit_phase(ctx: RunContext, module: CTRModule, epochs: int, callbacks: list, select_on_val: bool = True,
              load_best: bool | None = None, early_stopping: dict | None = None,
              max_steps: int | None = None) -> tuple[pl.Trainer, dict]:
    """One `Trainer.fit` (resumed from its epoch-end checkpoint if there is one). `select_on_val` keeps a
    best-on-val checkpoint; `load_best` (default: the same) loads it into `module` at the end.
    `early_stopping` ({patience, min_delta}, needs `select_on_val`): `epochs` is then the maximum."""
    phase = module.phase
    load_best = select_on_val if load_best is None else load_best
    interrupt = ctx.cfg.debug.interrupt
    if interrupt and interrupt.phase == phase:
        callbacks = [*callbacks, InterruptAt(interrupt.phase, interrupt.epoch)]
    stopper = None
    if early_stopping is not None:
        if not select_on_val:
            raise ValueError(f"early stopping of {phase} needs validation (select_on_val)")
        stopper = StageEarlyStopping(module.val_monitor, early_stopping["patience"], early_stopping["min_delta"],
                                     module.monitor_mode)
        callbacks = [*callbacks, stopper]
    decay = lr_decay_config(ctx.cfg) if select_on_val and module.compression is None else None
    if decay is not None:  # never in a compress stage: there lr is also the prox step η1 of the method
        decay = PlateauDecay(module.val_monitor, module.monitor_mode, decay["factor"], decay["patience"],
                             min_lr=decay["min_lr"])
        callbacks = [*callbacks, decay]
    throughput = Throughput()
    trainer = make_trainer(ctx, module, epochs, [throughput, *callbacks], select_on_val, max_steps)
    point = ctx.resume_point(phase)
    if point is not None:  # what the first part logged after the resume point is trained and logged again
        for lg in ctx.loggers:
            if isinstance(lg, RunCSVLogger):
                lg.drop_rows_after(phase, point[1])
    t0 = time.perf_counter()
    try:
        trainer.fit(module, datamodule=ctx.datamodule, ckpt_path=None if point is None else str(point[0]))
    except NonFiniteLossError as err:
        last = ctx.checkpoint_dir(phase) / "epoch-end.ckpt"
        kept = f"; last good checkpoint kept: {last}" if last.exists() else "; no checkpoint was written yet"
        raise NonFiniteLossError(f"{err}{kept}") from None
    if trainer.is_global_zero:
        discard_previous(ctx.checkpoint_dir(phase))  # the stage's fit ended: its epoch-end is final
    stats = {"train_seconds": round(time.perf_counter() - t0, 2),
             "samples_per_second": round(throughput.samples_per_second, 1),
             "steps": int(trainer.global_step),
             # Epochs begun (an early stop at a mid-epoch validation ends that epoch there), resumed ones included.
             "epochs_run": int(trainer.current_epoch)}
    if throughput.peak_memory_bytes is not None:  # a CUDA run: this process's peak, in MiB
        stats["peak_gpu_memory_mib"] = round(throughput.peak_memory_bytes / 2**20, 1)
    if stopper is not None:
        stats["stopped_early"] = stopper.stopped
    if decay is not None:
        stats["lr_decays"] = list(decay.decays)
    best = trainer.checkpoint_callback.best_model_path if select_on_val else ""
    if best:
        stats["best_checkpoint"] = best
        if load_best:
            module.load_weights(best)
    return trainer, stats


def measure_metrics(ctx: RunContext, model: DLRM, phase: str, splits=("val", "test")) -> dict:
    """<split>_* metrics of `model` as it is (one pass over each of `splits`), under the metric prefix `phase`."""
    module = make_module(ctx, model, phase)
    return evaluate(make_trainer(ctx, module, 0, [], select_on_val=False), module, ctx, splits=splits)


def measure_in_process(ctx: RunContext, model: DLRM, phase: str, splits=("val", "test")) -> dict:
    """`measure_metrics` without a Trainer: this process evaluates `model` over the whole of each split (the same
    metrics, binned AUROC and logloss, as a Trainer's evaluation). For a model that only one process holds, e.g. the
    quantized tables of record on rank 0 under trainer=torchrec (DMP cannot shard quantized tables)."""
    out = {}
    for split in splits:
        # sync_on_compute off: the other ranks (under trainer=torchrec) are not evaluating with this process.
        metrics = ctr_metrics(ctx.cfg.eval.auroc_bins, sync_on_compute=False)
        logloss = LogLoss(sync_on_compute=False)
        for logits, label in split_logits(model, ctx.datamodule, split, ctx.cfg.trainer.get(f"limit_{split}_batches")):
            metrics.update(torch.sigmoid(logits), label.long())
            logloss.update(logits, label)
        out.update({f"{split}_{k}": float(v) for k, v in metrics.compute().items()})
        out[f"{split}_logloss"] = float(logloss.compute())
    if "test" in splits:
        out.update(_test_predictions(ctx, model, phase))
    return out


def holdout_batches(ctx: RunContext, model: DLRM, count: int = 3) -> list[tuple]:
    """The first `count` validation batches of this process, on the model's device."""
    return first_val_batches(ctx.datamodule, model_device(model), count)
