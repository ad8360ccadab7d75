"""One run, phase by phase: dense pretrain -> [ADMM compression -> extraction -> finetune] -> test.

`train.py` hands the composed Hydra config to `run()`. Each phase is a separate `Trainer.fit`, so shapes
that change between phases (extraction) never meet a live optimizer, checkpoint or DDP wrapper.
Checkpoints are selected on validation AUC; the final report is on test.

Resuming: rerun with the same `hydra.run.dir` and `resume=true`. Finished phases are read back from
their markers (`phases/<phase>.json`); an unfinished one continues from its last epoch-end checkpoint
(weights, optimizer, s/y/z and their Adam moments, loop counters), so it ends exactly where an
uninterrupted run would.
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

from callbacks.extraction import PruningExtraction
from callbacks.finetune import Finetune
from callbacks.interrupt import InterruptAt
from callbacks.sparsity import SparsityLogger
from callbacks.throughput import Throughput

from .compressed import load_compressed, read_compressed, save_compressed
from .compression import UMEC, ADMMConfig, Kept
from .config import ConfigError, validate_config
from .data import CTRDataModule
from .io import write_json
from .latency import latency_ms
from .models import DLRM, DLRMStructure, dense_structure, measure
from .module import CTRModule, NonFiniteLossError

log = logging.getLogger(__name__)


def build_datamodule(cfg: DictConfig) -> CTRDataModule:
    ld = cfg.loader
    return CTRDataModule(
        source=instantiate(cfg.data),
        cache_root=ld.cache_root,
        batch_size=ld.batch_size,
        eval_batch_size=ld.eval_batch_size,
        num_workers=ld.num_workers,
        seed=cfg.seed,
        limit_rows=OmegaConf.to_container(ld.limit_rows) if ld.limit_rows else None,
    )


def dense_structure_for(model_cfg: DictConfig, meta) -> DLRMStructure:
    return dense_structure(
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


def make_umec(model: DLRM, cfg: DictConfig) -> UMEC:
    """The ADMM for the mode's group sets and the budgets; config problems become ConfigErrors."""
    admm = cfg.mode.admm
    try:
        config = ADMMConfig(
            eta_w=float(cfg.optim.lr),
            eta_s=float(admm.eta_s),
            eta_y=float(admm.eta_y),
            eta_z=float(admm.eta_z),
            s_optimizer=str(admm.s_optimizer),
            normalize_norms=bool(admm.get("normalize_norms", False)),
            s_step_by_set_size=bool(admm.get("s_step_by_set_size", False)),
            budgets={"flops": cfg.budget.flops, "params": cfg.budget.params},
        )
    except ValueError as err:
        raise ConfigError(f"config key `mode.admm` / `budget`: {err}") from None
    try:
        return UMEC(model, set(cfg.mode.groups), config, mode=cfg.mode.name)
    except ValueError as err:
        key = "budget" if "budget" in str(err) else "mode.groups"
        raise ConfigError(f"config key `{key}` (mode={cfg.mode.name}, model={cfg.model.name}): {err}") from None


def check_compression_config(cfg: DictConfig, model: DLRM) -> None:
    """Reject an unreachable budget or a missing group set before any training. Building the ADMM reads
    only shapes; the gate it may add for `dot` dims is taken off again so dense training is untouched."""
    had_gate = model.dim_gate is not None
    make_umec(model, cfg)
    if not had_gate:
        model.dim_gate = None


@dataclass
class RunContext:
    cfg: DictConfig
    run_dir: Path
    datamodule: CTRDataModule
    loggers: list = field(default_factory=list)

    def phase_marker(self, phase: str) -> Path:
        return self.run_dir / "phases" / f"{phase}.json"

    def checkpoint_dir(self, phase: str) -> Path:
        return self.run_dir / "checkpoints" / phase

    def finished(self, phase: str) -> dict | None:
        """The marker of a finished phase when resuming, else None."""
        marker = self.phase_marker(phase)
        if self.cfg.resume and marker.exists():
            import json

            return json.loads(marker.read_text())
        return None

    def resume_checkpoint(self, phase: str) -> str | None:
        path = self.checkpoint_dir(phase) / "epoch-end.ckpt"
        return str(path) if self.cfg.resume and path.exists() else None


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


def make_trainer(ctx: RunContext, phase: str, epochs: int, callbacks: list, select_on_val: bool) -> pl.Trainer:
    t = ctx.cfg.trainer
    ckpt_dir = str(ctx.checkpoint_dir(phase))
    # `epoch-end` is the resume point (exact: data order is a function of seed and epoch);
    # `best` (validation AUC) is what the phase hands on.
    checkpoints = [ModelCheckpoint(dirpath=ckpt_dir, filename="epoch-end", save_on_train_epoch_end=True,
                                   enable_version_counter=False)]
    if select_on_val:
        checkpoints.insert(0, ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/auc", mode="max",
                                              save_top_k=1, enable_version_counter=False))
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
        val_check_interval=ctx.cfg.eval.val_check_interval if select_on_val else 1.0,
        deterministic=t.deterministic,
        enable_progress_bar=t.enable_progress_bar,
        enable_model_summary=False,
        logger=ctx.loggers or False,
        callbacks=[*checkpoints, *callbacks],
        log_every_n_steps=ctx.cfg.log_every_n_steps,
        num_sanity_val_steps=0,
        # The datamodule shards whole batches across ranks itself.
        use_distributed_sampler=False,
        default_root_dir=str(ctx.run_dir),
    )


def make_module(ctx: RunContext, model: DLRM, phase: str, compression=None) -> CTRModule:
    cfg = ctx.cfg
    return CTRModule(model, lr=cfg.optim.lr, phase=phase, compression=compression,
                     auroc_bins=cfg.eval.auroc_bins, log_every_n_steps=cfg.log_every_n_steps)


def evaluate(trainer: pl.Trainer, module: CTRModule, ctx: RunContext, split: str) -> dict:
    """val_* or test_* metrics of `module` as it is."""
    run_eval = trainer.validate if split == "val" else trainer.test
    (metrics,) = run_eval(module, datamodule=ctx.datamodule, verbose=False)
    return {f"{split}_{k.split('/')[-1]}": float(v) for k, v in metrics.items() if k.startswith(f"{split}/")}


def fit_phase(ctx: RunContext, module: CTRModule, phase: str, epochs: int, callbacks: list,
              select_on_val: bool = True, load_best: bool | None = None) -> tuple[pl.Trainer, dict]:
    """One `Trainer.fit` (resumed from its epoch-end checkpoint if there is one). `select_on_val` keeps a
    best-on-val checkpoint; `load_best` (default: the same) loads it into `module` at the end."""
    load_best = select_on_val if load_best is None else load_best
    throughput = Throughput()
    interrupt = ctx.cfg.debug.interrupt
    if interrupt and interrupt.phase == phase:
        callbacks = [*callbacks, InterruptAt(interrupt.phase, interrupt.epoch)]
    trainer = make_trainer(ctx, phase, epochs, [throughput, *callbacks], select_on_val)
    t0 = time.perf_counter()
    try:
        trainer.fit(module, datamodule=ctx.datamodule, ckpt_path=ctx.resume_checkpoint(phase))
    except NonFiniteLossError as err:
        last = ctx.checkpoint_dir(phase) / "epoch-end.ckpt"
        kept = f"; last good checkpoint kept: {last}" if last.exists() else "; no checkpoint was written yet"
        raise NonFiniteLossError(f"{err}{kept}") from None
    stats = {"train_seconds": round(time.perf_counter() - t0, 2),
             "samples_per_second": round(throughput.samples_per_second, 1)}
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
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise ConfigError(f"config key `pretrained`: {path} is not a Lightning checkpoint ({err})") from None
    saved = ckpt.get("dlrm_structure")
    if saved is not None and saved != model.structure.to_dict():
        diff = [k for k in saved if saved[k] != model.structure.to_dict().get(k)]
        raise ConfigError(
            f"config key `pretrained`: {path} was trained with another model/data config "
            f"(differs in {', '.join(diff)}); this run uses model={ctx.cfg.model.name}, data={ctx.cfg.data.name}"
        )
    ours = model.state_dict()
    bad = [k for k in ours if k not in state or state[k].shape != ours[k].shape]
    if bad:
        raise ConfigError(
            f"config key `pretrained`: {path} does not fit model={ctx.cfg.model.name}: "
            f"{len(bad)} mismatched tensors, e.g. {bad[0]}"
        )
    model.load_state_dict({k: state[k] for k in ours})


def dense_phase(ctx: RunContext, model: DLRM) -> tuple[CTRModule, pl.Trainer, dict]:
    """Pretrain (or load) the dense model; returns it with its val/test metrics."""
    cfg = ctx.cfg
    module = make_module(ctx, model, "pretrain")
    done = ctx.finished("pretrain")
    if cfg.pretrained:
        load_pretrained(ctx, model, cfg.pretrained)
        trainer, stats = make_trainer(ctx, "pretrain", 0, [], select_on_val=False), {"pretrained": cfg.pretrained}
    elif done:
        module.load_weights(done["best_checkpoint"])
        trainer, stats = make_trainer(ctx, "pretrain", 0, [], select_on_val=False), done
    else:
        trainer, stats = fit_phase(ctx, module, "pretrain", cfg.phases.pretrain_epochs, [])
    metrics = {**evaluate(trainer, module, ctx, "val"), **evaluate(trainer, module, ctx, "test")}
    if not done and trainer.is_global_zero:
        write_json(ctx.phase_marker("pretrain"), stats)
    return module, trainer, {**stats, **metrics}


def compress_phase(ctx: RunContext, model: DLRM) -> tuple[DLRM, Kept, dict]:
    """ADMM over the mode's group sets, then extraction. Returns the extracted model and its structure."""
    cfg = ctx.cfg
    extracted_path = ctx.checkpoint_dir("admm") / "extracted.pt"
    done = ctx.finished("admm")
    if done:
        stored = read_compressed(extracted_path)
        return stored.model, stored.kept, done
    umec = make_umec(model, cfg)
    module = make_module(ctx, model, "admm", compression=umec)
    sparsity = SparsityLogger(cfg.log_every_n_steps, out_dir=ctx.run_dir)
    extraction = PruningExtraction(out_dir=ctx.run_dir)
    trainer, stats = fit_phase(ctx, module, "admm", cfg.phases.admm_epochs, [sparsity, extraction],
                               select_on_val=False)
    stats["extra_groups_pruned_at_extraction"] = extraction.extra_groups
    stats["groups_restored_at_extraction"] = extraction.restored_groups
    stats["admm_steps"] = trainer.global_step
    if trainer.is_global_zero:
        save_compressed(extracted_path, extraction.extracted, extraction.kept, {"phase": "admm"})
        write_json(ctx.phase_marker("admm"), stats)
    return extraction.extracted, extraction.kept, stats


def finetune_phase(ctx: RunContext, slim: DLRM, kept: Kept, extra: dict) -> tuple[CTRModule, pl.Trainer, dict]:
    """Finetune the extracted model (the `Finetune` callback keeps the best-on-val weights and writes
    compressed.pt); with finetune_epochs=0 the extracted model is saved as it is."""
    cfg = ctx.cfg
    module = make_module(ctx, slim, "finetune")
    path = ctx.run_dir / "compressed.pt"
    done = ctx.finished("finetune")
    if done:
        module.model = load_compressed(path)
        trainer, stats = make_trainer(ctx, "finetune", 0, [], select_on_val=False), done
    elif cfg.phases.finetune_epochs > 0:
        # The Finetune callback loads the best-on-val weights itself, before it writes compressed.pt.
        trainer, stats = fit_phase(ctx, module, "finetune", cfg.phases.finetune_epochs,
                                   [Finetune(kept, path, extra)], select_on_val=True, load_best=False)
    else:
        trainer, stats = make_trainer(ctx, "finetune", 0, [], select_on_val=False), {}
        if trainer.is_global_zero:
            save_compressed(path, slim, kept, extra)
    if not done and trainer.is_global_zero:
        write_json(ctx.phase_marker("finetune"), stats)
    metrics = {**evaluate(trainer, module, ctx, "val"), **evaluate(trainer, module, ctx, "test")}
    return module, trainer, {**stats, **metrics}


def removal_order(run_dir: Path) -> list[str]:
    """Features in the order ADMM first pruned them (from the sparsity history), for the report."""
    import json

    path = run_dir / "sparsity_history.json"
    order: list[str] = []
    if path.exists():
        for record in json.loads(path.read_text())["history"]:
            order += [f for f in record.get("pruned_features", []) if f not in order]
    return order


def feature_report(kept: Kept, structure: DLRMStructure, meta) -> dict:
    names = structure.sparse_names
    removed = [names[i] for i in structure.feature_ids if i not in set(kept.feature_ids)]
    report = {"features_removed": removed + ([] if kept.use_dense else ["dense"])}
    if meta.noise_features is not None:
        noise = set(meta.noise_features)
        report["noise_features_removed"] = sorted(set(removed) & noise, key=names.index)
        report["informative_features_removed"] = sorted(set(removed) - noise, key=names.index)
        report["noise_features"] = list(meta.noise_features)
    return report


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Runs every phase the mode asks for and writes `<run_dir>/summary.json`. Returns the summary."""
    validate_config(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    # The prox shrinks pruned groups geometrically; denormal floats would make every multiply slow.
    torch.set_flush_denormal(True)
    dm = build_datamodule(cfg)
    dm.ensure_ready()
    meta = dm.meta
    structure = dense_structure_for(cfg.model, meta)
    compressing = cfg.mode.name != "dense"
    model = DLRM(structure, sparse_grad=bool(cfg.model.sparse_grad), seed=cfg.seed)
    if compressing:
        check_compression_config(cfg, model)
    dense_cost = measure(model)
    ctx = RunContext(cfg=cfg, run_dir=run_dir, datamodule=dm, loggers=make_loggers(cfg, run_dir))
    summary: dict = {
        "mode": cfg.mode.name,
        "data": {"name": cfg.data.name, "rows": dict(meta.rows), "cache_fingerprint": meta.fingerprint},
        "model": cfg.model.name,
        "seed": cfg.seed,
        "dense_flops": dense_cost.flops,
        "dense_params": dense_cost.params,
        "dense_bytes": dense_cost.bytes,
    }
    if meta.oracle_auc:
        summary["oracle_auc"] = meta.oracle_auc.get("test")
        summary["oracle_val_auc"] = meta.oracle_auc.get("val")
    if meta.skipped_lines:
        summary["skipped_lines"] = meta.skipped_lines
    try:
        module, trainer, dense = dense_phase(ctx, model)
        if not compressing:
            summary.update(dense)
        else:
            summary.update({f"dense_{k}": v for k, v in dense.items() if k.startswith(("val_", "test_"))})
            summary["pretrain"] = {k: v for k, v in dense.items() if not k.startswith(("val_", "test_"))}
            dense_latency = latency_ms(model, cfg.latency.batches, cfg.latency.repeats, seed=cfg.seed)
            slim, kept, admm_stats = compress_phase(ctx, model)
            cost = measure(slim)
            budget = {k: cfg.budget[k] for k in ("flops", "params") if cfg.budget[k] is not None}
            ratios = {"flops": cost.flops / dense_cost.flops, "params": cost.params / dense_cost.params}
            extra = {"mode": cfg.mode.name, "model": cfg.model.name, "data": cfg.data.name, "budget": budget,
                     "dense_flops": dense_cost.flops, "dense_params": dense_cost.params}
            fmodule, ftrainer, finetuned = finetune_phase(ctx, slim, kept, extra)
            summary.update({k: v for k, v in finetuned.items() if k.startswith(("val_", "test_"))})
            summary.update({
                "budget": budget,
                "flops": cost.flops,
                "params": cost.params,
                "bytes": cost.bytes,
                "table_bytes": cost.table_bytes,
                "flops_ratio": ratios["flops"],
                "params_ratio": ratios["params"],
                "table_bytes_ratio": cost.table_bytes / dense_cost.table_bytes,
                "compression_ratio": {k: 1 - v for k, v in ratios.items()},
                "budget_met": all(ratios[k] <= b + 1e-12 for k, b in budget.items()),
                "kept": kept_report(kept, slim, structure),
                **feature_report(kept, structure, meta),
                "feature_pruning_order": removal_order(run_dir),
                "admm": admm_stats,
                "finetune": {k: v for k, v in finetuned.items() if not k.startswith(("val_", "test_"))},
                "compressed_path": str(run_dir / "compressed.pt"),
            })
            reloaded = load_compressed(run_dir / "compressed.pt")
            summary["latency_ms"] = {
                "dense": dense_latency,
                "compressed": latency_ms(reloaded, cfg.latency.batches, cfg.latency.repeats, seed=cfg.seed),
            }
            trainer = ftrainer
        if trainer.is_global_zero:
            write_json(run_dir / "summary.json", summary)
            log.info("summary written to %s", run_dir / "summary.json")
            for lg in ctx.loggers:
                lg.log_metrics({f"summary/{k}": v for k, v in summary.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)})
        return summary
    finally:
        for lg in ctx.loggers:
            if isinstance(lg, WandbLogger):
                import wandb

                if wandb.run is not None:
                    wandb.finish()
            else:
                lg.finalize("success")


def kept_report(kept: Kept, slim: DLRM, dense: DLRMStructure) -> dict:
    """What survives, by name, read off the extracted model (neurons per layer, dims per table)."""
    s = slim.structure
    return {
        "features": (["dense"] if s.use_dense else []) + s.feature_names,
        "neurons": {name: m.out_features for name, m in slim.linear_layers().items()},
        "dims": {name: int(t.embedding_dim) for name, t in slim.sparse.tables.items()},
        "pairs": len(s.kept_pairs()) if s.interaction == "dot" else None,
        "dense_neurons": {f"dense.layers.{i}": w for i, w in enumerate(dense.bottom)}
        | {f"over.layers.{i}": w for i, w in enumerate(dense.top)},
    }
