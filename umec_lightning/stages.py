"""The phases of a run as data: a mode lists its stages, this module runs each kind.

    pretrain   train the dense model (or load `pretrained=`), evaluate it: the reference of every comparison
    compress   a compression method trains (or not: 0 epochs for one-shot methods) and ends; the extraction
               callback turns its outcome into a physically smaller model
    finetune   train the current (extracted) model, keep its best-on-validation weights
    scratch    the method decides a structure from the dense one before any training; a fresh model of
               that structure trains from scratch (handcrafted narrow MLPs)

A mode says e.g. `stages: [pretrain, compress, finetune]`, or with per-stage keys
`{kind: compress, name: select, epochs: 0, method: {...}, reduction_share: 0.2}` (cascaded). Defaults:
`name` = kind, `epochs` = `phases.<kind>_epochs` (scratch, or `epochs: total`: the sum of all three),
`method` = `mode.method`,
`reduction_share` = 1 (the stage meets the final budget; 0.2 = it makes 20 % of the reduction, i.e. budget
1 − 0.2·(1 − b)). Every finished stage leaves a marker (`phases/<name>.json`), so `resume=true` skips it.

Training length: with `phases.early_stopping.patience` set, pretrain and finetune stages stop once their
validation AUC has not risen by `min_delta` for `patience` validation checks (`eval.val_check_interval` 0.5:
two per epoch); their epochs are then the maximum. Compress stages never stop early (the method's schedule
is their length), nor scratch ones (the equal-epochs control). Every trained stage records `epochs_run`, the
ones that can stop early `stopped_early`.

Optimizer: `optim` (group conf/optim/: sgd, the paper's and the default; adam; adagrad) is a Hydra `_partial_`
config of a `torch.optim` class; `optim.lr` is its learning rate (and UMEC's η1), passed by the module.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

from .callbacks.extraction import PruningExtraction
from .callbacks.finetune import Finetune
from .callbacks.interrupt import InterruptAt
from .callbacks.plateau import PlateauDecay
from .callbacks.sparsity import SparsityLogger
from .callbacks.throughput import Throughput
from .checkpoint_io import AtomicCheckpointIO, discard_previous, resume_point
from .compressed import read_compressed, save_compressed
from .compression.compose import compose_kept
from .compression.extract import extracted_structure
from .compression.kept import Kept
from .compression.method import CompressionMethod
from .config import ConfigError
from .data import CTRDataModule
from .io import write_json
from .loggers import RunCSVLogger
from .models import DLRM, DLRMStructure, measure
from .models.dlrm import InitScheme
from .module import CTRModule, NonFiniteLossError, OptimizerFactory, first_val_batches
from .predictions import save_test_predictions
from .run_dir import launched_rank_zero
from .sharded.checkpoint import read_checkpoint, read_checkpoint_into

log = logging.getLogger(__name__)

STAGE_KINDS = ("pretrain", "compress", "finetune", "scratch")
EARLY_STOPPING_KINDS = ("pretrain", "finetune")  # compress: the method's schedule; scratch: equal epochs
_EPOCH_KEYS = {"pretrain": "pretrain_epochs", "compress": "compress_epochs", "finetune": "finetune_epochs"}


@dataclass
class Stage:
    kind: str
    name: str
    epochs: int
    method: DictConfig | None = None  # compress / scratch: the method's config (`_target_` + arguments)
    reduction_share: float = 1.0
    early_stopping: dict | None = None  # {patience, min_delta} (pretrain / finetune with it on), else None
    steps: int | None = None  # compress: optimizer steps instead of `epochs` (None: epochs decide)

    def make_method(self) -> CompressionMethod:
        try:
            method = instantiate(self.method)
        except Exception as err:  # noqa: BLE001 - Hydra wraps every constructor error the same way
            cause = err.__cause__ or err
            raise ConfigError(f"config key `mode.method` (stage {self.name}): {cause}") from None
        if not isinstance(method, CompressionMethod):
            raise ConfigError(f"config key `mode.method._target_` (stage {self.name}): "
                              f"{type(method).__name__} is not a CompressionMethod")
        return method


def early_stopping_config(cfg: DictConfig) -> dict | None:
    """`phases.early_stopping` checked: {patience, min_delta}, or None when off (patience null, the default)."""
    node = cfg.phases.get("early_stopping")
    if node is None or node.get("patience") is None:
        return None
    unknown = set(node) - {"patience", "min_delta"}
    if unknown:
        raise ConfigError(f"config key `phases.early_stopping`: unknown keys {sorted(unknown)}")
    patience, min_delta = node.patience, node.get("min_delta", 0.0)
    if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
        raise ConfigError("config key `phases.early_stopping.patience` must be null (off) or an integer >= 1 "
                          f"(validation checks without improvement), got {patience!r}")
    if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or not min_delta >= 0:
        raise ConfigError(f"config key `phases.early_stopping.min_delta` must be a number >= 0, got {min_delta!r}")
    return {"patience": patience, "min_delta": float(min_delta)}


def lr_decay_config(cfg: DictConfig) -> dict | None:
    """`phases.lr_decay` checked: {factor, patience, min_lr}, or None when off (factor null, the default)."""
    node = cfg.phases.get("lr_decay")
    if node is None or node.get("factor") is None:
        return None
    unknown = set(node) - {"factor", "patience", "min_lr"}
    if unknown:
        raise ConfigError(f"config key `phases.lr_decay`: unknown keys {sorted(unknown)}")
    factor, patience, min_lr = node.factor, node.get("patience", 1), node.get("min_lr", 0.0)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < 1:
        raise ConfigError(f"config key `phases.lr_decay.factor` must be null (off) or in (0, 1), got {factor!r}")
    if not isinstance(patience, int) or isinstance(patience, bool) or patience < 1:
        raise ConfigError("config key `phases.lr_decay.patience` must be an integer >= 1 (validation checks "
                          f"without improvement), got {patience!r}")
    if isinstance(min_lr, bool) or not isinstance(min_lr, (int, float)) or not min_lr >= 0:
        raise ConfigError(f"config key `phases.lr_decay.min_lr` must be a number >= 0, got {min_lr!r}")
    return {"factor": float(factor), "patience": patience, "min_lr": float(min_lr)}


def regularization_config(cfg: DictConfig) -> dict:
    """`regularization` and `eval.monitor` checked: the CTRModule arguments they give (module.py)."""
    from .module import EMBEDDING_ROWS, MONITORS

    node = cfg.get("regularization") or {}
    unknown = set(node) - {"embedding_l2", "embedding_rows", "dense_l2", "max_grad_norm"}
    if unknown:
        raise ConfigError(f"config key `regularization`: unknown keys {sorted(unknown)}")
    out = {}
    for key in ("embedding_l2", "dense_l2"):
        value = node.get(key, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ConfigError(f"config key `regularization.{key}` must be a number >= 0, got {value!r}")
        out[key] = float(value)
    rows = node.get("embedding_rows", "auto")
    if rows not in EMBEDDING_ROWS:
        raise ConfigError(f"config key `regularization.embedding_rows` must be one of {', '.join(EMBEDDING_ROWS)}, "
                          f"got {rows!r}")
    out["embedding_rows"] = rows
    clip = node.get("max_grad_norm")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
        raise ConfigError(f"config key `regularization.max_grad_norm` must be null (off) or a number > 0, got {clip!r}")
    out["max_grad_norm"] = None if clip is None else float(clip)
    if out["dense_l2"] > 0 and float(cfg.optim.get("weight_decay", 0.0) or 0.0) > 0:
        raise ConfigError("config keys `regularization.dense_l2` and `optim.weight_decay` are both set: the first "
                          "decays every parameter but the tables, the second every parameter; set one")
    monitor = cfg.eval.get("monitor", "auc")
    if monitor not in MONITORS:
        raise ConfigError(f"config key `eval.monitor` must be one of {', '.join(MONITORS)}, got {monitor!r}")
    out["monitor"] = monitor
    return out


def collapse_threshold(cfg: DictConfig) -> float:
    """`eval.collapse_threshold` checked (`compression.collapse`)."""
    threshold = cfg.eval.get("collapse_threshold", 0.2)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise ConfigError(f"config key `eval.collapse_threshold` must lie in (0, 1], got {threshold!r}")
    return float(threshold)


def init_scheme(cfg: DictConfig) -> InitScheme:
    """`model.embedding_std` and `model.zero_bias` checked (`models.dlrm.InitScheme`)."""
    std, zero_bias = cfg.model.get("embedding_std"), cfg.model.get("zero_bias", False)
    if std is not None and (isinstance(std, bool) or not isinstance(std, (int, float)) or not std > 0):
        raise ConfigError(f"config key `model.embedding_std` must be null (reference init) or a number > 0, "
                          f"got {std!r}")
    if not isinstance(zero_bias, bool):
        raise ConfigError(f"config key `model.zero_bias` must be true or false, got {zero_bias!r}")
    return InitScheme(None if std is None else float(std), zero_bias)


def optimizer_factory(cfg: DictConfig) -> OptimizerFactory:
    """The optimizer every stage uses, from `optim`: `factory(params, lr=...)`. ConfigError naming the key
    when it does not build a usable `torch.optim.Optimizer` (tried on a probe parameter: bad arguments fail
    here, before any work)."""
    node = cfg.optim
    if "_target_" not in node:  # `optim: {lr: ...}` alone: the reference SGD
        return torch.optim.SGD
    target = node._target_
    try:
        factory = instantiate(node, _partial_=True, _convert_="all")
    except Exception as err:  # noqa: BLE001 - Hydra wraps every lookup error the same way
        raise ConfigError(f"config key `optim._target_`: {_one_line(err)}") from None
    cls = getattr(factory, "func", None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"config key `optim._target_`: {target} is not a torch.optim.Optimizer")
    if issubclass(cls, torch.optim.SparseAdam):
        raise ConfigError("config key `optim._target_`: SparseAdam takes only sparse gradients and the MLPs' are "
                          "dense; use optim=adam (tables then get dense gradients) or optim=adagrad (sparse)")
    try:
        factory([torch.nn.Parameter(torch.zeros(1))], lr=float(node.lr))
    except Exception as err:  # noqa: BLE001 - any constructor error is a bad argument of the config
        raise ConfigError(f"config key `optim` ({target}): {_one_line(err)}") from None
    return factory


def _one_line(err: BaseException) -> str:
    cause = err.__cause__ or err
    return " ".join(str(cause).split()) or type(cause).__name__


def parse_stages(cfg: DictConfig) -> list[Stage]:
    """The mode's stage list with every default filled in; ConfigError naming the key on a bad entry.
    Also checks what every stage's training shares (`optim`, `phases.early_stopping`) before any work."""
    raw = cfg.mode.get("stages")
    if not raw:
        raise ConfigError("config key `mode.stages` must list the stages of the mode, e.g. [pretrain]")
    optimizer_factory(cfg)
    regularization_config(cfg)
    lr_decay_config(cfg)
    collapse_threshold(cfg)
    init_scheme(cfg)
    early_stopping = early_stopping_config(cfg)
    phases = cfg.phases
    stages: list[Stage] = []
    for i, item in enumerate(raw):
        where = f"mode.stages[{i}]"
        item = {"kind": item} if isinstance(item, str) else OmegaConf.to_container(item, resolve=True)
        kind = item.get("kind")
        if kind not in STAGE_KINDS:
            raise ConfigError(f"config key `{where}.kind` must be one of {', '.join(STAGE_KINDS)}, got {kind!r}")
        unknown = set(item) - {"kind", "name", "epochs", "steps", "method", "reduction_share"}
        if unknown:
            raise ConfigError(f"config key `{where}`: unknown keys {sorted(unknown)}")
        total = sum(int(phases[k]) for k in _EPOCH_KEYS.values())
        default_epochs = total if kind == "scratch" else int(phases[_EPOCH_KEYS[kind]])
        epochs = item.get("epochs", default_epochs)
        if epochs == "total":  # as many epochs as a compressed run trains in all (equal-epochs controls)
            epochs = total
        if not isinstance(epochs, int) or epochs < 0:
            raise ConfigError(f"config key `{where}.epochs` must be an integer >= 0, got {epochs!r}")
        method = None
        if kind in ("compress", "scratch"):
            method = OmegaConf.create(item["method"]) if "method" in item else cfg.mode.get("method")
            if method is None or "_target_" not in method:
                raise ConfigError(f"config key `mode.method`: stage {where} ({kind}) needs a method with a `_target_`")
        steps = item.get("steps", phases.get("compress_steps") if kind == "compress" else None)
        if steps is not None and kind != "compress":
            raise ConfigError(f"config key `{where}.steps`: only a compress stage runs for a number of steps")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            key = f"{where}.steps" if "steps" in item else "phases.compress_steps"
            raise ConfigError(f"config key `{key}` must be an integer >= 0 (optimizer steps) or null, got {steps!r}")
        share = item.get("reduction_share", 1.0)
        if not isinstance(share, (int, float)) or not 0 < share <= 1:
            raise ConfigError(f"config key `{where}.reduction_share` must be in (0, 1], got {share!r}")
        stages.append(Stage(kind, item.get("name", kind), epochs, method, float(share),
                            early_stopping if kind in EARLY_STOPPING_KINDS else None, steps))
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"config key `mode.stages`: stage names must be distinct, got {names}")
    if stages[0].kind != "pretrain":
        raise ConfigError("config key `mode.stages`: the first stage must be `pretrain` (the dense reference)")
    return stages


def stage_budget(cfg: DictConfig, stage: Stage) -> dict[str, float]:
    """The stage's budgets as fractions of the *dense* model: 1 − share·(1 − b) for every budget b set."""
    return {k: 1 - stage.reduction_share * (1 - float(cfg.budget[k]))
            for k in ("flops", "params") if cfg.budget[k] is not None}


def relative_budget(budget: dict[str, float], dense_cost, model: DLRM) -> dict[str, float]:
    """Budgets as fractions of `model` (a method sees its input model as "dense")."""
    cost = measure(model)
    now = {"flops": cost.flops / dense_cost.flops, "params": cost.params / dense_cost.params}
    return {k: b / now[k] for k, b in budget.items()}


@dataclass
class RunState:
    """What the stages hand each other: the current model and what it keeps of the dense one."""

    dense: DLRM
    model: DLRM
    kept: Kept
    dense_cost: object
    compressed: bool = False
    metrics: dict | None = None  # val/test metrics of the current model, when a stage measured them
    stats: dict = field(default_factory=dict)  # stage name -> its figures
    feature_order: list[str] = field(default_factory=list)
    same_epochs: dict | None = None  # the shared reference's equal-epochs control: {epochs, val_*, test_*}


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


# ---- trainers and fits ---------------------------------------------------------------------------------


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


def make_strategy(t: DictConfig, record: dict | None = None):
    """`trainer.strategy` for pl.Trainer: its name, or for `torchrec` the strategy that shards the tables
    (umec_lightning/sharded/strategy.py) under `trainer.sharding`, recording each phase's shards in `record`."""
    if t.strategy != "torchrec":
        return t.strategy
    from .sharded.strategy import TorchrecStrategy

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
    return pl.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=make_strategy(t, ctx.sharded_tables),
        num_nodes=t.num_nodes,
        precision=t.precision,
        # A step count replaces the epochs (a last epoch may be partial; `epoch-end.ckpt` is then written
        # where the steps end).
        max_epochs=epochs if max_steps is None else (0 if max_steps == 0 else -1),
        max_steps=-1 if max_steps is None else max_steps,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        limit_test_batches=t.limit_test_batches,
        val_check_interval=ctx.cfg.eval.val_check_interval if select_on_val else 1.0,
        deterministic=t.deterministic,
        enable_progress_bar=t.enable_progress_bar,
        enable_model_summary=False,
        logger=ctx.loggers or False,
        callbacks=[*checkpoints, *callbacks],
        # Every checkpoint written atomically (a full disk leaves the old one), the previous epoch-end kept.
        plugins=[AtomicCheckpointIO()],
        log_every_n_steps=ctx.cfg.log_every_n_steps,
        num_sanity_val_steps=0,
        # The datamodule shards whole batches across ranks itself.
        use_distributed_sampler=False,
        default_root_dir=str(ctx.run_dir),
    )


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
    if "test" in splits and trainer.is_global_zero and module.model.holds_tables \
            and ctx.cfg.eval.get("test_predictions", True):
        # Per-row test predictions (umec_lightning/predictions.py): the report's paired tests on the same rows.
        path = ctx.run_dir / f"test_predictions_{module.phase}.npz"
        limit = ctx.cfg.trainer.get("limit_test_batches")
        out["test_predictions"] = str(save_test_predictions(path, module.model, ctx.datamodule, limit).resolve())
    return out


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
    trainer = make_trainer(ctx, module, epochs, [Throughput(), *callbacks], select_on_val, max_steps)
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
             "samples_per_second": round(module.samples_per_second, 1),
             "steps": int(trainer.global_step),
             # Epochs begun (an early stop at a mid-epoch validation ends that epoch there), resumed ones included.
             "epochs_run": int(trainer.current_epoch)}
    if module.peak_memory_bytes is not None:  # a CUDA run: this process's peak, in MiB
        stats["peak_gpu_memory_mib"] = round(module.peak_memory_bytes / 2**20, 1)
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


def load_pretrained(ctx: RunContext, model: DLRM, path: str) -> None:
    """Dense weights from a checkpoint of an earlier run; refuses one made for another model config."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config key `pretrained`: no such checkpoint {path}")
    try:
        head = read_checkpoint(p, tables=False)  # the main file, memory-mapped, without its tables
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise ConfigError(f"config key `pretrained`: {path} is not a Lightning checkpoint ({err})") from None
    saved = head.get("dlrm_structure")
    if saved is not None:
        # Through the dataclass, so a checkpoint written before a field existed compares by its defaults.
        saved = DLRMStructure.from_dict(saved).to_dict()
    if saved is not None and saved != model.structure.to_dict():
        ours = model.structure.to_dict()
        diff = [k for k in sorted(set(saved) | set(ours)) if saved.get(k) != ours.get(k)]
        raise ConfigError(
            f"config key `pretrained`: {path} was trained with another model/data config "
            f"(differs in {', '.join(diff)}); this run uses model={ctx.cfg.model.name}, data={ctx.cfg.data.name}"
        )
    try:
        # A sharded run's tables are assembled straight into the model's own; a model without its tables
        # (a rank but 0 under trainer=torchrec) reads none and gets placeholders.
        ckpt = read_checkpoint_into(model, p)
    except ValueError as err:  # a table's shards do not have the model's shape
        raise ConfigError(f"config key `pretrained`: {path} does not fit model={ctx.cfg.model.name}: {err}") from None
    except Exception as err:  # noqa: BLE001 - as above
        raise ConfigError(f"config key `pretrained`: {path} is not a Lightning checkpoint ({err})") from None
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    model.sparse.fuse_table_keys_(state, "sparse.")  # a checkpoint from before the tables were grouped
    ours = model.state_dict()
    bad = [k for k in ours if k not in state or state[k].shape != ours[k].shape]
    if bad:
        raise ConfigError(
            f"config key `pretrained`: {path} does not fit model={ctx.cfg.model.name}: "
            f"{len(bad)} mismatched tensors, e.g. {bad[0]}"
        )
    model.load_state_dict({k: state[k] for k in ours})


def train_and_evaluate(ctx: RunContext, module: CTRModule, stage: Stage, callbacks: list) -> dict:
    """Train `module` for the stage's epochs with best-on-val selection (or take the finished stage's best
    weights when resuming), evaluate, leave the marker. Returns the stage's figures with val/test metrics.
    With the stage's early stopping on, its epochs are the maximum."""
    marker = ctx.finished(stage.name)  # the stage's figures when resuming a run that finished it, else None
    if marker:
        if marker.get("best_checkpoint"):
            module.load_weights(marker["best_checkpoint"])
        trainer, stats = make_trainer(ctx, module, 0, [], select_on_val=False), marker
    elif stage.epochs > 0:
        trainer, stats = fit_phase(ctx, module, stage.epochs, callbacks, early_stopping=stage.early_stopping)
        if stage.kind in EARLY_STOPPING_KINDS:
            stats.setdefault("stopped_early", False)  # early stopping off: it ran its epochs
    else:
        trainer, stats = make_trainer(ctx, module, 0, [], select_on_val=False), {}
    if not marker and trainer.is_global_zero:
        write_json(ctx.phase_marker(stage.name), stats)
    return {**stats, **evaluate(trainer, module, ctx)}


# ---- the stage kinds -----------------------------------------------------------------------------------


def pretrain_stage(ctx: RunContext, stage: Stage, state: RunState) -> None:
    """Pretrain (or load) the dense model and measure it: the reference of every comparison."""
    cfg = ctx.cfg
    module = make_module(ctx, state.model, stage.name)
    path, stats = cfg.pretrained, {}
    if not path and ctx.reference is not None:
        # The shared dense run's pretrain point (trained now if no run has yet) and its equal-epochs control.
        record = ctx.reference.ensure(ctx, state.model)
        path, stats = record["pretrain_checkpoint"], {"dense_reference": record["key"]}
        state.same_epochs = record["same_epochs"][str(ctx.reference.epochs)]
    if path:
        load_pretrained(ctx, state.model, path)  # also when resuming: the marker holds no weights
        trainer = make_trainer(ctx, module, 0, [], select_on_val=False)
        stats = {"pretrained": path, **stats}
        if trainer.is_global_zero:
            write_json(ctx.phase_marker(stage.name), stats)
        figures = {**stats, **evaluate(trainer, module, ctx)}
    else:
        figures = train_and_evaluate(ctx, module, stage, [])
    state.stats[stage.name] = figures
    state.metrics = {k: v for k, v in figures.items() if k.startswith(("val_", "test_"))}


def compress_stage(ctx: RunContext, stage: Stage, state: RunState) -> None:
    """The method trains for the stage's epochs, then the extraction callback builds the smaller model."""
    cfg = ctx.cfg
    extracted_path = ctx.checkpoint_dir(stage.name) / "extracted.pt"
    marker = ctx.finished(stage.name)  # the stage's figures when resuming a run that finished it, else None
    if marker:
        stored = read_compressed(extracted_path, hold_tables=state.model.holds_tables)
        state.model, state.kept = stored.model, stored.kept
        stats = marker
    else:
        method = stage.make_method()
        budgets = relative_budget(stage_budget(cfg, stage), state.dense_cost, state.model)
        forced = _importance_the_budget_forces(ctx, method, state.model, budgets)
        method.setup(state.model, budgets)  # before the optimizer exists: it may add parameters
        module = make_module(ctx, state.model, stage.name, compression=method)
        suffix = "" if stage.name == "compress" else f"_{stage.name}"
        callbacks = [SparsityLogger(cfg.log_every_n_steps, out_dir=ctx.run_dir, suffix=suffix),
                     PruningExtraction(record_dir=ctx.run_dir)]
        trainer, stats = fit_phase(ctx, module, stage.epochs, callbacks, select_on_val=False, max_steps=stage.steps)
        result = module.extracted
        stats.update(result.info)
        stats["budget_of_input_model"] = budgets
        if forced is not None:
            stats["budget_forces_importance"] = forced
        # What the surgery alone did, before any finetune (the collapse guard's first look).
        stats.update({f"{k}_after_extraction": v for k, v in validate(ctx, result.model, stage.name).items()})
        stats["feature_pruning_order"] = _removal_order(module.compression_history)
        kept = compose_kept(state.kept, result.kept, state.model.structure, state.dense.structure)
        if trainer.is_global_zero:
            save_compressed(extracted_path, result.model, kept, {"phase": stage.name})
            write_json(ctx.phase_marker(stage.name), stats)
        state.model, state.kept = result.model, kept
    state.compressed = True
    state.metrics = None  # the weights changed: the last measured metrics are not this model's
    state.stats[stage.name] = stats
    state.feature_order += [f for f in stats.get("feature_pruning_order", []) if f not in state.feature_order]


def holdout_batches(ctx: RunContext, model: DLRM, count: int = 3) -> list[tuple]:
    """The first `count` validation batches of this process, on the model's device."""
    return first_val_batches(ctx.datamodule, next(model.over.parameters()).device, count)


def _importance_the_budget_forces(ctx: RunContext, method, model: DLRM, budgets: dict) -> dict | None:
    """For a method that removes input features only (input_selection): the held-out importance share the budget
    forces out at least (`collapse.importance_a_budget_forces`), said before any training when it is most of it.
    None for other methods, or where this process does not hold the tables (trainer=torchrec's ranks but 0)."""
    if getattr(method, "kinds", None) != {"feature"} or not model.holds_tables:
        return None
    from .compression.ablation import mean_ablation_scores
    from .compression.collapse import importance_a_budget_forces

    forced = importance_a_budget_forces(model, mean_ablation_scores(model, holdout_batches(ctx, model)), budgets)
    if forced is not None and forced["share_of_importance"] > 0.5:
        names = ", ".join(f["name"] for f in forced["features"][:4])
        log.warning("this budget can only be met by removing input features that carry at least %.0f%% of the "
                    "dense model's held-out importance (%s): expect a much worse model, or raise the budget",
                    100 * forced["share_of_importance"], names)
    return forced


def validate(ctx: RunContext, model: DLRM, phase: str) -> dict:
    """val_* metrics of `model` as it is (one validation pass)."""
    module = make_module(ctx, model, phase)
    return evaluate(make_trainer(ctx, module, 0, [], select_on_val=False), module, ctx, splits=("val",))


def finetune_stage(ctx: RunContext, stage: Stage, state: RunState) -> None:
    """Train the extracted model; the `Finetune` callback ends it on its best-on-validation weights."""
    module = make_module(ctx, state.model, stage.name)
    figures = train_and_evaluate(ctx, module, stage, [Finetune()])
    state.stats[stage.name] = {k: v for k, v in figures.items() if not k.startswith(("val_", "test_"))}
    state.metrics = {k: v for k, v in figures.items() if k.startswith(("val_", "test_"))}


def scratch_stage(ctx: RunContext, stage: Stage, state: RunState) -> None:
    """The method's structure, decided before any training, trained from scratch (fresh initial weights)."""
    cfg = ctx.cfg
    method = stage.make_method()
    method.setup(state.dense, relative_budget(stage_budget(cfg, stage), state.dense_cost, state.dense))
    outcome = method.finish(state.dense)
    model = DLRM(extracted_structure(state.dense, outcome.kept), sparse_grad=bool(cfg.model.sparse_grad),
                 seed=cfg.seed, hold_tables=state.dense.holds_tables, init=init_scheme(cfg))
    module = make_module(ctx, model, stage.name)
    figures = train_and_evaluate(ctx, module, stage, [])
    state.model, state.kept, state.compressed = model, outcome.kept, True
    state.stats[stage.name] = {**{k: v for k, v in figures.items() if not k.startswith(("val_", "test_"))},
                               **outcome.info}
    state.metrics = {k: v for k, v in figures.items() if k.startswith(("val_", "test_"))}


STAGE_RUNNERS = {"pretrain": pretrain_stage, "compress": compress_stage, "finetune": finetune_stage,
                 "scratch": scratch_stage}


def final_metrics(ctx: RunContext, state: RunState) -> dict:
    """The current model's val/test metrics (measured now if the last stage changed its weights)."""
    if state.metrics is None:
        module = make_module(ctx, state.model, "final")
        state.metrics = evaluate(make_trainer(ctx, module, 0, [], select_on_val=False), module, ctx)
    return state.metrics


def _removal_order(history: list[dict]) -> list[str]:
    """Features in the order the method first pruned them (from the logged history)."""
    order: list[str] = []
    for record in history:
        order += [f for f in record.get("pruned_features", []) if f not in order]
    return order
