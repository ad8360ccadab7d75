"""One run: the stages its mode declares (`stages/`), then the report, `compressed.pt` and `summary.json`.

`train.py` hands the composed Hydra config to `run()`. Each stage is a separate `Trainer.fit`, so shapes
that change between stages (extraction) never meet a live optimizer, checkpoint or DDP wrapper.
Checkpoints are selected on validation AUC; the final report is on test. The orchestration never asks
which method it runs: a mode names its method by `_target_` and lists its stages.

Resuming: rerun with the same `hydra.run.dir`, the same overrides and `resume=true` (a resume whose
config differs in anything that changes the result is refused, naming the keys). Finished stages are read
back from their markers (`phases/<stage>.json`); an unfinished one continues from its last epoch-end
checkpoint (weights, optimizer, the method's state, loop counters), so it ends exactly where an
uninterrupted run would.

The run dir (`run_dir.py`): one run at a time holds it (a lock); one that holds an earlier run's outputs is refused
unless `resume=true` or `overwrite=true`; a run that fails leaves `failed.json` with the reason. Checkpoints are
written atomically (`checkpoint_io.py`), and a resumed run's `metrics.csv` keeps the first part's rows (`loggers.py`).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger

from .compressed import save_compressed
from .compression import Kept
from .config import ConfigError, flat_config, init_scheme, result_neutral, validate_config
from .data import CTRDataModule
from .export_report import export_report, files_report
from .io import write_json
from .models import measure
from .models.family import family_of
from .quant import model_bytes, served
from .quant.plan import loosest_plan, param_weights, params_budget, row_weights
from .reference import shared_reference
from .run_dir import RunDirError, claim, holding, launched_rank_zero, record_failure, run_outputs
from .sharded import FUSABLE_OPTIMIZERS, holds_tables_of_record
from .stages import RunContext, StageInput, parse_stages, run_stage, stage_budget
from .stages.training import configured_callbacks
from .summary import compression_report, result_table

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
        equal_eval_batches=cfg.trainer.strategy == "torchrec",
    )


def dense_structure_for(model_cfg: DictConfig, meta):
    """The dense model of this data, as the config's model family builds it (`models.family`)."""
    return family_of(model_cfg).dense_structure(model_cfg, meta)


def make_loggers(cfg: DictConfig, run_dir: Path) -> list:
    """Every logger of `logger` (`_target_` configs; a null entry is off), writing under `run_dir`."""
    loggers = []
    for name, node in (cfg.get("logger") or {}).items():
        if node is None:
            continue
        if "_target_" not in node:
            raise ConfigError(f"config key `logger.{name}` needs a `_target_` (a Lightning logger class) or null")
        logger = instantiate(node, save_dir=str(run_dir))
        if isinstance(logger, WandbLogger):  # its files beside the run's, and the resolved config with them
            (run_dir / "wandb").mkdir(parents=True, exist_ok=True)  # (its run starts at the first use, just below)
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        loggers.append(logger)
    return loggers


def result_config(cfg: DictConfig) -> dict:
    """The resolved config as flat `key: value`, without the keys that do not change the result
    (`config.RESULT_NEUTRAL_KEYS`): what a resume must match."""
    return {k: v for k, v in flat_config(cfg).items() if not result_neutral(k)}


def check_resume(cfg: DictConfig, run_dir: Path) -> None:
    """The first run records its config (`run_config.json`); `resume=true` must match it."""
    path = run_dir / "run_config.json"
    ours = json.loads(json.dumps(result_config(cfg)))
    if cfg.resume and path.exists():
        theirs = json.loads(path.read_text())
        diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k, "<unset>") != theirs.get(k, "<unset>"))
        if diff:
            shown = ", ".join(f"{k} ({theirs.get(k, '<unset>')!r} -> {ours.get(k, '<unset>')!r})" for k in diff[:8])
            raise RunDirError(  # a refusal of the run dir: no failed.json there, the earlier run did not fail
                f"resume=true in {run_dir}, but the config differs from that run's in: {shown}"
                f"{' ...' if len(diff) > 8 else ''}. Resume with the original overrides, or start a new run dir."
            )
    elif launched_rank_zero():  # one writer: the other ranks of a multi-process launch start with rank 0
        write_json(path, ours)


def check_widths_alone(cfg: DictConfig, stages, structure) -> None:
    """A bytes budget met by table widths alone (a `bits` stage, no compression method in the mode): refused before
    the data when the lowest widths the `quantize` stage can complete to (int4 tables, fp16 Linears) with the served
    files' own bytes (`quant.served`) are still over it."""
    if structure is None or cfg.budget.get("bytes") is None or not any(s.kind == "bits" for s in stages) \
            or any(s.method is not None for s in stages):
        return
    with torch.device("meta"):  # shapes only: no tables allocated
        model = family_of(cfg.model).build(structure)
    floor = loosest_plan(model, "auto", 32)
    formats = served.served_formats(cfg)
    files = served.largest_served(model, floor, served.format_overheads(model, floor, formats))
    dense = model_bytes(model)["total"]
    if files > float(cfg.budget.bytes) * dense:
        raise ConfigError(f"config key `budget.bytes`: {cfg.budget.bytes} is out of reach of mode={cfg.mode.name}, "
                          f"which only quantizes: at int4 tables and fp16 Linears the largest served file "
                          f"({', '.join(formats)}) holds {files / dense:.3f} of the dense model's bytes; prune too "
                          "(e.g. mode=joint_quant or mode=lowrank_quant) or raise the budget")


def check_stages(cfg: DictConfig, stages, structure=None) -> None:
    """Every method of the run is built and asked whether it can serve its budget, before any training.
    With `structure` None only what needs no data is checked (the methods' arguments, a missing budget)."""
    family = family_of(cfg.model)
    budgets = {k: v for k, v in cfg.budget.items() if v is not None}
    if any(stage.kind == "quantize" for stage in stages):  # it meets budget.bytes (by table widths)
        budgets.pop("bytes", None)
    if budgets and all(stage.method is None for stage in stages) and not cfg.mode.get("accepts_budget", False):
        raise ConfigError(f"config key `budget`: mode={cfg.mode.name} compresses nothing, so "
                          f"{', '.join(f'budget.{k}={v}' for k, v in budgets.items())} would be ignored; "
                          "pick a compression mode (e.g. mode=joint) or drop the budget")
    auto = [s.name for s in stages if s.kind == "bits" and s.options.get("tables") == "auto"]
    if auto and cfg.budget.get("bytes") is None:
        raise ConfigError(f"config key `budget.bytes`: stage {auto[0]} chooses widths (`tables: auto`) for a bytes "
                          "budget; set budget.bytes (a fraction of the fp32 dense model's bytes, e.g. 0.1)")
    for i, stage in enumerate(stages):
        if stage.method is None:
            continue
        method = stage.make_method()
        missing = method.needs - family.offers
        if missing:
            raise ConfigError(f"mode={cfg.mode.name}: stage {stage.name}'s method ({method.name}) needs what "
                              f"model={cfg.model.name} (family {family.name}) does not offer yet: "
                              f"{', '.join(sorted(missing))}")
        if method.requires_finetune and not any(s.kind == "finetune" for s in stages[i + 1:]):
            raise ConfigError(f"mode={cfg.mode.name}: stage {stage.name}'s method ({method.name}) changes what the "
                              "model computes (e.g. mode.method.factor_activation=true) and needs a finetune "
                              "stage after it in `mode.stages`")
        budget = stage_budget(cfg, stage)
        if method.targets_budget and not budget:
            raise ConfigError(f"mode={cfg.mode.name} needs a budget: set budget.flops, budget.params and/or "
                              "budget.bytes in (0, 1]")
        if structure is None:
            continue
        with torch.device("meta"):  # shapes only: no tables allocated
            model = family.build(structure)
        bits = [s for s in stages[:i] if s.kind == "bits"]
        if bits and cfg.budget.get("bytes") is not None:
            # Quantized storage leaves the pruning a larger params share of budget.bytes; before the data the widths
            # an `auto` stage picks are unknown: the method is asked about the largest share they could leave.
            plan = loosest_plan(model, bits[-1].options["tables"], bits[-1].options["dense"])
            model.table_param_weights, model.table_row_weights = param_weights(plan), row_weights(plan)  # as run
        try:
            if bits and cfg.budget.get("bytes") is not None:  # the served files' own bytes held back, as run
                reserve = served.method_reserve(cfg, method, model, plan)
                limit = float(cfg.budget.bytes) * model_bytes(model)["total"]
                if reserve >= limit:
                    raise ValueError(f"budget.bytes={cfg.budget.bytes} is {limit:.0f} bytes, and the files served "
                                     f"({', '.join(served.served_formats(cfg))}) need {reserve} of their own "
                                     "(structure, code, graph: "
                                     "measured on a miniature of the model, quant/served.py) before any tensor")
                budget = stage_budget(cfg, stage, params_budget(model, plan, float(cfg.budget.bytes), reserve))
            method.check(model, budget)
        except ValueError as err:
            key = "budget" if "budget" in str(err) else "mode.method"
            raise ConfigError(f"config key `{key}` (mode={cfg.mode.name}, model={cfg.model.name}, "
                              f"stage {stage.name}): {err}") from None


def check_torchrec(cfg: DictConfig) -> None:
    """`trainer=torchrec` (tables sharded by torchrec) trains with plain SGD or Adagrad, in fp32: anything
    else is refused here, before any work. Every mode and method runs under it (their groups live on dense weights)."""
    if cfg.trainer.strategy != "torchrec":
        return
    target = cfg.optim.get("_target_", "torch.optim.SGD")
    # The tables train with fbgemm's fused counterpart of `optim` (sharded.plan.fused_params): the same update
    # only for plain SGD and plain Adagrad.
    if target not in FUSABLE_OPTIMIZERS or any(cfg.optim.get(k) for k in FUSABLE_OPTIMIZERS[target]):
        raise ConfigError(f"config key `optim` ({target}): trainer=torchrec trains the tables with fbgemm's fused "
                          "exact SGD or exact Adagrad, so `optim` must be plain SGD (optim=sgd, no momentum or "
                          "weight decay) or plain Adagrad (optim=adagrad, no weight or lr decay, accumulators "
                          "from 0) to stay the same model as a single-process run")
    regularization = cfg.get("regularization") or {}
    if regularization.get("embedding_l2"):
        raise ConfigError("config key `regularization.embedding_l2`: not supported under trainer=torchrec yet (its "
                          "tables train inside fbgemm's fused optimizer, which this project does not give the "
                          "penalty); set it to 0")
    if (cfg.phases.get("lr_decay") or {}).get("factor") is not None:
        raise ConfigError("config key `phases.lr_decay.factor`: not supported under trainer=torchrec yet (the fused "
                          "table optimizer keeps its own learning rate); set it to null")
    if cfg.trainer.precision not in ("32-true", "32", 32):
        raise ConfigError(f"config key `trainer.precision`: trainer=torchrec runs in fp32 (32-true) only, got "
                          f"{cfg.trainer.precision!r}")
    try:
        import torchrec  # noqa: F401
    except ImportError as err:
        raise ConfigError(f"trainer=torchrec needs torchrec and fbgemm-gpu: `make torchrec` ({err})") from None


def progress_bar_enabled(setting: bool | None, stream=None) -> bool:
    """`trainer.enable_progress_bar`: true or false as set; null (the default) = on only when `stream` (stdout,
    where Lightning's bars write) is a terminal: in a log file every redraw of a bar stays, megabytes a run."""
    if setting is not None:
        return bool(setting)
    stream = sys.stdout if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Runs every stage the mode declares and writes `<run_dir>/summary.json`. Returns the summary.

    The config's own checks come first (bad input: one line, before any work), then the run dir is claimed
    (`run_dir.claim`, unless train.py's Hydra callback did): RunDirError when another run holds it or it holds an
    earlier run's outputs without `resume=true` / `overwrite=true`. A run that fails leaves `failed.json` with the
    reason, in a dir it holds or that holds no earlier run's outputs."""
    held = None
    try:
        stages = check_config(cfg)
        held = claim(run_dir, resume=bool(cfg.get("resume", False)), overwrite=bool(cfg.get("overwrite", False)))
        return _run(cfg, run_dir, stages)
    except BaseException as err:
        if launched_rank_zero() and not isinstance(err, RunDirError) and (holding(run_dir) or not run_outputs(run_dir)):
            record_failure(run_dir, err)
        raise
    finally:
        if held is not None:
            held.release()


def check_config(cfg: DictConfig) -> list:
    """What needs neither data nor the run dir: the config's values, the stage list, the methods' arguments.
    Returns the stages."""
    validate_config(cfg)
    OmegaConf.update(cfg, "trainer.enable_progress_bar",
                     progress_bar_enabled(cfg.trainer.get("enable_progress_bar")), force_add=True)
    stages = parse_stages(cfg)
    configured_callbacks(cfg)  # a bad `callbacks.<name>` fails here, not at the first fit
    check_torchrec(cfg)
    if cfg.trainer.strategy == "torchrec":
        for i, stage in enumerate(stages):
            if stage.options.get("qat"):
                raise ConfigError(f"config key `mode.stages[{i}].qat`: quantization-aware finetuning fake-quantizes "
                                  "the tables in the process, and trainer=torchrec shards them; finetune in float "
                                  "there (qat: false: the quantize stage then quantizes the gathered tables)")
    check_stages(cfg, stages, None)
    return stages


def _run(cfg: DictConfig, run_dir: Path, stages: list) -> dict:
    pl.seed_everything(cfg.seed, workers=True)
    # The prox shrinks pruned groups geometrically; denormal floats would make every multiply slow.
    torch.set_flush_denormal(True)
    dm = build_datamodule(cfg)
    dm.ensure_ready()
    meta = dm.meta
    structure = dense_structure_for(cfg.model, meta)
    check_stages(cfg, stages, structure)
    check_widths_alone(cfg, stages, structure)
    check_resume(cfg, run_dir)
    model = family_of(cfg.model).build(structure, sparse_grad=bool(cfg.model.sparse_grad), seed=cfg.seed,
                                       hold_tables=holds_tables_of_record(cfg.trainer.strategy), init=init_scheme(cfg))
    dense_cost = measure(model)
    ctx = RunContext(cfg=cfg, run_dir=run_dir, datamodule=dm, loggers=make_loggers(cfg, run_dir),
                     reference=shared_reference(cfg, stages, meta.fingerprint, structure))
    summary: dict = {
        "mode": cfg.mode.name,
        "method": cfg.mode.method._target_.rsplit(".", 1)[-1] if cfg.mode.get("method") else None,
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
    if meta.feature_importance:  # planted truth of synthetic data: std of each feature's logit share
        summary["feature_importance"] = dict(meta.feature_importance)
    if meta.skipped_lines:
        summary["skipped_lines"] = meta.skipped_lines
    status = "failed"
    try:
        # The stages, in order: each takes what the one before handed on and returns its result.
        start = given = StageInput(dense=model, dense_cost=dense_cost, model=model, kept=Kept.everything(model))
        results = []
        for stage in stages:
            results.append(run_stage(ctx, stage, given))
            given = given.after(results[-1])
        final = results[-1]
        compressed = any(r.compressed for r in results)
        if not compressed:
            summary.update({**results[0].figures, **results[0].metrics})
        else:
            summary.update(compression_report(ctx, start, results, structure, meta))
        if ctx.sharded_tables:  # trainer=torchrec: each phase's table shards, bytes per rank
            summary["sharded_tables"] = dict(ctx.sharded_tables)
        if _is_global_zero():
            if compressed:
                save_compressed(run_dir / "compressed.pt", final.model, final.kept,
                                {k: summary[k] for k in ("mode", "model", "budget", "dense_flops", "dense_params")}
                                | {"data": cfg.data.name})
                summary.update(export_report(cfg, run_dir, final.model, start.dense))
                summary.update(files_report(run_dir, summary))
            write_json(run_dir / "summary.json", summary)
            log.info("summary written to %s", run_dir / "summary.json")
            for lg in ctx.loggers:
                lg.log_metrics({f"summary/{k}": v for k, v in summary.items()
                                if isinstance(v, (int, float)) and not isinstance(v, bool)})
            print(result_table(summary, run_dir), flush=True)
        status = "success"
        return summary
    finally:
        close_loggers(ctx.loggers, status)


def _is_global_zero() -> bool:
    return not torch.distributed.is_available() or not torch.distributed.is_initialized() \
        or torch.distributed.get_rank() == 0


def close_loggers(loggers: list, status: str) -> None:
    """Finalise every logger with the run's real status (a failed run is not reported as a success)."""
    for lg in loggers:
        if isinstance(lg, WandbLogger):
            import wandb

            if wandb.run is not None:
                wandb.finish(exit_code=0 if status == "success" else 1)
        else:
            lg.finalize(status)




