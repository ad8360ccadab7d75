"""One run, phase by phase: dense pretrain -> (ADMM compression -> extraction -> finetune) -> test.

`train.py` hands the composed Hydra config to `run()`. Each phase is a separate `Trainer.fit`, so shapes
that change between phases (extraction) never meet a live optimizer, checkpoint or DDP wrapper.
Checkpoints are selected on validation AUC; the final report is on test.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from callbacks.throughput import Throughput

from .config import validate_config
from .data import CTRDataModule
from .io import write_json
from .models import DLRM, dense_structure, measure
from .module import CTRModule

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig) -> CTRDataModule:
    d = cfg.data
    return CTRDataModule(
        source=instantiate(d.source),
        cache_root=d.cache_root,
        batch_size=d.batch_size,
        eval_batch_size=d.eval_batch_size,
        num_workers=d.num_workers,
        seed=cfg.seed,
        limit_rows=OmegaConf.to_container(d.limit_rows) if d.get("limit_rows") else None,
    )


def build_model(model_cfg: DictConfig, meta, seed: int) -> DLRM:
    structure = dense_structure(
        sparse_names=list(meta.sparse_names),
        table_sizes=list(meta.table_sizes),
        embedding_dim=int(model_cfg.embedding_dim),
        bottom=list(model_cfg.bottom),
        top=list(model_cfg.top),
        num_dense=len(meta.dense_names),
        interaction=model_cfg.interaction,
        self_interaction=bool(model_cfg.self_interaction),
        dense_names=list(meta.dense_names),
    )
    return DLRM(structure, sparse_grad=bool(model_cfg.sparse_grad), seed=seed)


@dataclass
class RunContext:
    cfg: DictConfig
    run_dir: Path
    datamodule: CTRDataModule
    loggers: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    @property
    def is_global_zero(self) -> bool:
        return int(getattr(self, "_rank", 0)) == 0


def make_loggers(cfg: DictConfig, run_dir: Path) -> list:
    loggers = []
    if cfg.logger.csv.enabled:
        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv", version=""))
    if cfg.logger.wandb.enabled:
        (run_dir / "wandb").mkdir(parents=True, exist_ok=True)
        loggers.append(
            WandbLogger(
                project=cfg.logger.wandb.project,
                name=cfg.run_name,
                save_dir=str(run_dir),
                mode=cfg.logger.wandb.mode,
                config=OmegaConf.to_container(cfg, resolve=True),
            )
        )
    return loggers


def make_trainer(ctx: RunContext, phase: str, epochs: int, callbacks: list, monitor: bool = True) -> pl.Trainer:
    t = ctx.cfg.trainer
    checkpoint = ModelCheckpoint(
        dirpath=str(ctx.run_dir / "checkpoints" / phase),
        filename="best",
        monitor="val/auc" if monitor else None,
        mode="max",
        save_last=True,
        save_top_k=1,
    )
    return pl.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        num_nodes=t.num_nodes,
        precision=t.precision,
        max_epochs=epochs,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        limit_test_batches=t.limit_test_batches,
        val_check_interval=ctx.cfg.eval.val_check_interval,
        deterministic=t.deterministic,
        enable_progress_bar=t.enable_progress_bar,
        logger=ctx.loggers or False,
        callbacks=[checkpoint, *callbacks],
        log_every_n_steps=ctx.cfg.log_every_n_steps,
        num_sanity_val_steps=0,
        # The datamodule shards batches across ranks itself (whole batches from memmaps).
        use_distributed_sampler=False,
        default_root_dir=str(ctx.run_dir),
    )


def evaluate(trainer: pl.Trainer, module: CTRModule, ctx: RunContext, split: str) -> dict:
    """val_* or test_* metrics of `module` as it is (no checkpoint loading)."""
    run = trainer.validate if split == "val" else trainer.test
    (metrics,) = run(module, datamodule=ctx.datamodule, verbose=False)
    return {f"{split}_{k.split('/')[-1]}": float(v) for k, v in metrics.items() if k.startswith(f"{split}/")}


def load_best(module: CTRModule, trainer: pl.Trainer) -> str | None:
    """Load the weights of the best-on-validation checkpoint of the last fit into `module`."""
    ckpt = trainer.checkpoint_callback
    path = ckpt.best_model_path if ckpt is not None else ""
    if path:
        state = torch.load(path, map_location="cpu", weights_only=False)
        module.load_state_dict(state["state_dict"])
        return path
    return None


def pretrain(ctx: RunContext, model: DLRM) -> tuple[CTRModule, dict]:
    cfg = ctx.cfg
    module = CTRModule(
        model,
        lr=cfg.optim.lr,
        phase="pretrain",
        auroc_bins=cfg.eval.auroc_bins,
        log_every_n_steps=cfg.log_every_n_steps,
    )
    throughput = Throughput()
    trainer = make_trainer(ctx, "pretrain", cfg.phases.pretrain_epochs, [throughput])
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=ctx.datamodule)
    train_seconds = time.perf_counter() - t0
    best = load_best(module, trainer)
    stats = {
        "train_seconds": round(train_seconds, 2),
        "samples_per_second": round(throughput.samples_per_second, 1),
        "best_checkpoint": best,
    }
    return module, stats | {"_trainer": trainer}


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Runs every phase the mode asks for and writes `<run_dir>/summary.json`. Returns the summary."""
    validate_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    dm = build_datamodule(cfg)
    dm.ensure_ready()
    meta = dm.meta
    model = build_model(cfg.model, meta, seed=cfg.seed)
    dense_cost = measure(model)
    ctx = RunContext(cfg=cfg, run_dir=run_dir, datamodule=dm, loggers=make_loggers(cfg, run_dir))
    try:
        summary: dict = {
            "mode": cfg.mode.name,
            "data": {"name": cfg.data.name, "rows": dict(meta.rows), "cache_fingerprint": meta.fingerprint},
            "model": cfg.model.name,
            "seed": cfg.seed,
            "dense_flops": dense_cost.flops,
            "dense_params": dense_cost.params,
            "dense_bytes": dense_cost.bytes,
        }
        module, stats = pretrain(ctx, model)
        trainer = stats.pop("_trainer")
        summary.update(evaluate(trainer, module, ctx, "val"))
        summary.update(evaluate(trainer, module, ctx, "test"))
        summary.update(stats)
        if meta.oracle_auc:
            summary["oracle_auc"] = meta.oracle_auc.get("test")
            summary["oracle_val_auc"] = meta.oracle_auc.get("val")
        if meta.skipped_lines:
            summary["skipped_lines"] = meta.skipped_lines
        if trainer.is_global_zero:
            write_json(run_dir / "summary.json", summary)
            log.info("summary written to %s", run_dir / "summary.json")
        for lg in ctx.loggers:
            if trainer.is_global_zero:
                lg.log_metrics({f"summary/{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
        return summary
    finally:
        for lg in ctx.loggers:
            if isinstance(lg, WandbLogger):
                import wandb

                if wandb.run is not None:
                    wandb.finish()
            else:
                lg.finalize("success")
