"""One run: the stages its mode declares (`stages.py`), then the report, `compressed.pt` and `summary.json`.

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
from contextlib import contextmanager
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from pytorch_lightning.loggers import WandbLogger

from .compressed import save_compressed
from .compression import Kept
from .compression.export import export_onnx, export_torchscript
from .config import ConfigError, flat_config, result_neutral, validate_config
from .data import CTRDataModule
from .io import write_json
from .latency import compare_latency
from .loggers import RunCSVLogger
from .models import DLRM, DLRMStructure, dense_structure, fold_batch_norm, measure
from .reference import shared_reference
from .run_dir import RunDirError, claim, holding, launched_rank_zero, record_failure, run_outputs
from .sharded import FUSABLE_OPTIMIZERS, holds_tables_of_record
from .stages import (
    STAGE_RUNNERS,
    RunContext,
    RunState,
    collapse_threshold,
    final_metrics,
    holdout_batches,
    init_scheme,
    parse_stages,
    stage_budget,
)

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


def dense_structure_for(model_cfg: DictConfig, meta) -> DLRMStructure:
    """The dense model for this data. Without dense features there is no bottom MLP (the stock model
    configs work unchanged); with them, an empty `model.bottom` is an error."""
    bottom = list(model_cfg.bottom or [])
    if not meta.dense_names:
        if bottom:
            log.info("the data has no dense features: the model has no bottom MLP (model.bottom=%s unused)",
                     bottom)
        bottom = []
    elif not bottom:
        raise ConfigError(f"config key `model.bottom` is empty, but the data has {len(meta.dense_names)} dense "
                          f"features ({', '.join(list(meta.dense_names)[:4])}…): give the bottom MLP's widths")
    settings = {}
    for key in ("batch_norm", "dropout"):
        value = model_cfg.get(key)
        settings[key] = OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) \
            else value
    try:
        return dense_structure(
            sparse_names=list(meta.sparse_names),
            table_sizes=list(meta.table_sizes),
            embedding_dim=int(model_cfg.embedding_dim),
            bottom=bottom,
            top=list(model_cfg.top),
            num_dense=len(meta.dense_names),
            interaction=model_cfg.interaction,
            self_interaction=bool(model_cfg.self_interaction),
            dense_names=list(meta.dense_names),
            **settings,
        )
    except ValueError as err:
        if "config key" in str(err):
            raise ConfigError(str(err)) from None
        raise


def make_loggers(cfg: DictConfig, run_dir: Path) -> list:
    loggers = []
    if cfg.logger.csv.enabled:
        # Appends to the run dir's metrics.csv (a resumed run keeps the first part's rows); Lightning's deletes it.
        loggers.append(RunCSVLogger(save_dir=str(run_dir), name="csv", version=""))
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


def feature_report(kept: Kept, structure: DLRMStructure, meta) -> dict:
    names = structure.sparse_names
    removed = [names[i] for i in structure.feature_ids if i not in set(kept.feature_ids)]
    report = {"features_removed": removed + (["dense"] if structure.use_dense and not kept.use_dense else [])}
    if meta.noise_features is not None:
        noise = set(meta.noise_features)
        report["noise_features_removed"] = sorted(set(removed) & noise, key=names.index)
        report["informative_features_removed"] = sorted(set(removed) - noise, key=names.index)
        report["noise_features"] = list(meta.noise_features)
    return report


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


def check_stages(cfg: DictConfig, stages, structure: DLRMStructure | None) -> None:
    """Every method of the run is built and asked whether it can serve its budget, before any training.
    With `structure` None only what needs no data is checked (the methods' arguments, a missing budget)."""
    budgets = {k: v for k, v in cfg.budget.items() if v is not None}
    if budgets and all(stage.method is None for stage in stages) and not cfg.mode.get("accepts_budget", False):
        raise ConfigError(f"config key `budget`: mode={cfg.mode.name} compresses nothing, so "
                          f"{', '.join(f'budget.{k}={v}' for k, v in budgets.items())} would be ignored; "
                          "pick a compression mode (e.g. mode=joint) or drop the budget")
    for i, stage in enumerate(stages):
        if stage.method is None:
            continue
        method = stage.make_method()
        if getattr(method, "requires_finetune", False) and not any(s.kind == "finetune" for s in stages[i + 1:]):
            raise ConfigError(f"mode={cfg.mode.name}: stage {stage.name}'s method ({method.name}) changes what the "
                              "model computes (e.g. mode.method.factor_activation=true) and needs a finetune "
                              "stage after it in `mode.stages`")
        budget = stage_budget(cfg, stage)
        if getattr(method, "targets_budget", True) and not budget:
            raise ConfigError(f"mode={cfg.mode.name} needs a budget: set budget.flops and/or budget.params in (0, 1]")
        if structure is None:
            continue
        with torch.device("meta"):  # shapes only: no tables allocated
            model = DLRM(structure)
        try:
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
    check_torchrec(cfg)
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
    check_resume(cfg, run_dir)
    model = DLRM(structure, sparse_grad=bool(cfg.model.sparse_grad), seed=cfg.seed,
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
        state = RunState(dense=model, model=model, kept=Kept.everything(model), dense_cost=dense_cost)
        for stage in stages:
            STAGE_RUNNERS[stage.kind](ctx, stage, state)
        if not state.compressed:
            summary.update(state.stats[stages[0].name])
        else:
            summary.update(compression_report(ctx, state, stages, structure, meta))
        if ctx.sharded_tables:  # trainer=torchrec: each phase's table shards, bytes per rank
            summary["sharded_tables"] = dict(ctx.sharded_tables)
        if _is_global_zero():
            if state.compressed:
                save_compressed(run_dir / "compressed.pt", state.model, state.kept,
                                {k: summary[k] for k in ("mode", "model", "budget", "dense_flops", "dense_params")}
                                | {"data": cfg.data.name})
                summary.update(export_report(cfg, run_dir, state.model))
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


# `export.<format>: true` writes the compressed model as served in that format, next to compressed.pt.
EXPORTS = {"torchscript": ("compressed.torchscript.pt", export_torchscript), "onnx": ("compressed.onnx", export_onnx)}


def export_report(cfg: DictConfig, run_dir: Path, model: DLRM) -> dict:
    """The compressed model in the formats `export` asks for (`compression.export`: batch norm folded, no dropout,
    each file checked against the eager model before it is written). A format that fails is named in
    `export_errors` with its error, and the run still writes its summary: an export does not lose the training."""
    wanted = [fmt for fmt in EXPORTS if (cfg.get("export") or {}).get(fmt)]
    if not wanted or not model.holds_tables:
        return {}
    exports, errors = {}, {}
    model.eval()  # as served; the run has no use for training mode after this
    for fmt in wanted:
        name, write = EXPORTS[fmt]
        try:
            with quiet_loggers(*EXPORTER_LOGGERS):
                exports[fmt] = str(write(model, run_dir / name, atol=1e-5))
        except Exception as err:  # noqa: BLE001 - a missing `onnx`, a failed check: reported, the run goes on
            errors[fmt] = f"{type(err).__name__}: {err}"
            log.error("export.%s failed: %s", fmt, errors[fmt])
    return {"exports": exports} | ({"export_errors": errors} if errors else {})


# The ONNX exporter's passes log every rewrite at INFO (a hundred lines per model) and warn about torchvision ops.
EXPORTER_LOGGERS = ("onnx_ir", "onnxscript", "torch.onnx")


@contextmanager
def quiet_loggers(*names: str, level: int = logging.ERROR):
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, levels):
            lg.setLevel(old)


def result_table(summary: dict, run_dir: Path) -> str:
    """The end of a run's console, read off `summary` (so it says what summary.json says): test AUC and logloss
    of the dense and the final model and their differences, the extracted model's measured FLOPs and params
    ratios, whether the budget was met and by whom, the collapse flag, and where the files are."""
    rows: list[tuple[str, str, str]] = []  # label, value(s), note

    def metrics(label: str, auc, logloss, fmt: str = "{:.4f}") -> None:
        rows.append((label, f"{fmt.format(auc):>9}  {'' if logloss is None else fmt.format(logloss):>12}", ""))

    budget = summary.get("budget") or {}
    compressed = "flops_ratio" in summary
    title = f"mode {summary['mode']}"
    if compressed:
        title += ", budget " + (", ".join(f"{k} {v:g}" for k, v in budget.items()) or "none")
        title += ": every figure measured on the extracted model"
    rows.append(("", f"{'test AUC':>9}  {'test logloss':>12}", ""))
    if not compressed:
        epochs = summary.get("epochs_run")
        label = "dense model" + (f", {epochs} epoch{'s' * (epochs != 1)}" if epochs is not None else "")
        metrics(label, summary["test_auc"], summary.get("test_logloss"))
    else:
        # The dense model compression started from, and the dense model trained as many epochs in all (the shared
        # reference's equal-epochs control, when `reference.dir` is set).
        same = summary.get("dense_same_epochs")
        ran = summary.get("dense_same_epochs_run")
        if same is not None and ran is not None and ran != same:  # under early stopping: what it really trained
            same = f"{ran} of <={same}"
        metrics("dense model", summary["dense_test_auc"], summary.get("dense_test_logloss"))
        if same is not None:
            metrics(f"dense model, {same} epochs", summary["dense_same_epochs_test_auc"],
                    summary.get("dense_same_epochs_test_logloss"))
        metrics("compressed model", summary["test_auc"], summary.get("test_logloss"))
        metrics("change vs dense", summary["delta_test_auc"], summary.get("delta_test_logloss"), "{:+.4f}")
        if same is not None:
            metrics(f"change vs dense, {same} epochs", summary["delta_test_auc_same_epochs"],
                    summary.get("delta_test_logloss_same_epochs"), "{:+.4f}")
    if summary.get("oracle_auc") is not None:
        rows.append(("oracle (planted truth)", f"{summary['oracle_auc']:>9.4f}", ""))
    if compressed:
        for key in ("flops", "params"):
            note = f"budget {budget[key]:g}" if key in budget else ""
            rows.append((f"{key} / dense", f"{summary[f'{key}_ratio']:>9.3f}", note))
        met = summary.get("budget_met")
        rows.append(("budget met", f"{'n/a' if met is None else 'yes' if met else 'NO':>9}", admm_note(summary)))
        collapse = summary.get("quality_collapse")
        note = "" if "lift_lost" not in summary else (
            f"validation lift over chance lost: {summary['lift_lost']:.1%} (a collapse above "
            f"{summary['collapse_threshold']:.0%})")
        rows.append(("quality collapse", f"{'n/a' if collapse is None else 'YES' if collapse else 'no':>9}", note))
    files = [("run dir", str(run_dir)), ("summary", str(run_dir / "summary.json"))]
    if compressed:
        files.append(("model file", str(run_dir / "compressed.pt")))
        files += [(f"export ({fmt})", path) for fmt, path in (summary.get("exports") or {}).items()]
        files += [(f"export ({fmt})", f"FAILED: {err}") for fmt, err in (summary.get("export_errors") or {}).items()]
    width = max(len(label) for label, _, _ in rows + [(f[0], "", "") for f in files]) + 2
    lines = [f"Result ({title})"]
    lines += [f"  {label:<{width}}{value}{'   ' + note if note else ''}".rstrip() for label, value, note in rows]
    lines += [f"  {label:<{width}}{path}" for label, path in files]
    return "\n".join(lines)


def admm_note(summary: dict) -> str:
    """How the last compress stage that reports it met the budget: ADMM alone, or with the share of the reduction
    the extraction forced (`budget_met_by`, `forced_share_of_reduction` of summary.json's stages)."""
    ends = [(name, stats) for name, stats in (summary.get("stages") or {}).items() if "budget_met_by" in stats]
    if not ends:
        return ""
    name, stats = ends[-1]
    where = f"stage {name}: " if len(ends) > 1 else ""
    after = stats.get("resource_after_admm") or {}
    reached = ", ".join(f"{k} {after[k]:.4f}" for k in (summary.get("budget") or {}) if k in after)
    if stats["budget_met_by"] == "admm":
        return f"{where}ADMM met it ({reached})"
    forced = stats.get("forced_share_of_reduction")
    return (f"{where}ADMM reached {reached}; the extraction made {forced:.1%} of the reduction"
            if forced is not None else f"{where}ADMM reached {reached}")


def compression_report(ctx: RunContext, state: RunState, stages, structure: DLRMStructure, meta) -> dict:
    """Every figure about the compressed model, measured on the extracted model itself."""
    cfg = ctx.cfg
    dense_cost, cost = state.dense_cost, measure(state.model)
    budget = {k: float(cfg.budget[k]) for k in ("flops", "params") if cfg.budget[k] is not None}
    ratios = {"flops": cost.flops / dense_cost.flops, "params": cost.params / dense_cost.params}
    dense_metrics = state.stats[stages[0].name]
    report = {f"dense_{k}": v for k, v in dense_metrics.items() if k.startswith(("val_", "test_"))}
    report.update(final_metrics(ctx, state))
    for metric in ("auc", "logloss"):  # logloss too: a CTR model's calibration is what bidding uses
        if f"test_{metric}" in report and f"dense_test_{metric}" in report:
            report[f"delta_test_{metric}"] = report[f"test_{metric}"] - report[f"dense_test_{metric}"]
    if state.same_epochs is not None:  # the fair control: the dense model trained as many epochs in all
        same = state.same_epochs
        report["dense_same_epochs"] = same["epochs"]
        report.update({f"dense_same_epochs_{k}": v for k, v in same.items() if k.startswith(("val_", "test_"))})
        # What the control really trained: with early stopping on, T is its maximum (reference.py).
        report.update({f"dense_same_epochs_{k.removeprefix('epochs_')}": same[k]
                       for k in ("epochs_run", "stopped_early", "early_stopping", "same_model_as") if k in same})
        for metric in ("auc", "logloss"):
            if f"test_{metric}" in report and f"test_{metric}" in same:
                report[f"delta_test_{metric}_same_epochs"] = report[f"test_{metric}"] - same[f"test_{metric}"]
    report.update({
        "budget": budget,
        "flops": cost.flops,
        "params": cost.params,
        "bytes": cost.bytes,
        "table_bytes": cost.table_bytes,
        "flops_ratio": ratios["flops"],
        "params_ratio": ratios["params"],
        "table_bytes_ratio": cost.table_bytes / dense_cost.table_bytes,
        # The share of the dense model's FLOPs/params removed (0.0: nothing pruned). Not "compression_ratio": a 0.0
        # there read as "compressed to nothing" (issue 24).
        "reduction": {k: 1 - v for k, v in ratios.items()},
        # None when no budget was set (group lasso cannot target one): nothing to meet.
        "budget_met": all(ratios[k] <= b + 1e-12 for k, b in budget.items()) if budget else None,
        "kept": kept_report(state.kept, state.model, structure),
        **feature_report(state.kept, structure, meta),
        "feature_pruning_order": state.feature_order,
        "pretrain": {k: v for k, v in dense_metrics.items() if not k.startswith(("val_", "test_"))},
        "stages": {s.name: state.stats[s.name] for s in stages[1:]},
        "compressed_path": str(ctx.run_dir / "compressed.pt"),
        # Rank 0 times the models (a sharded run's other ranks hold no tables; rank 0 writes the summary).
        "latency_ms": latency_report(state, cfg) if state.model.holds_tables else None,
    })
    report.update(collapse_report(ctx, state, stages, report))
    return report


def collapse_report(ctx: RunContext, state: RunState, stages, report: dict) -> dict:
    """The collapse guard (`compression.collapse`): the share of the dense model's validation lift over chance
    lost after the (last) extraction and by the final model; `quality_collapse` when the final model lost more
    than `eval.collapse_threshold`, then with its cause (the removed features by held-out importance on the
    dense model) and a one-line warning."""
    from .compression.ablation import mean_ablation_scores
    from .compression.collapse import importance_removed, lift_lost

    threshold = collapse_threshold(ctx.cfg)
    dense = report.get("dense_val_auc")
    if dense is None or "val_auc" not in report:
        return {}
    out = {"lift_lost": lift_lost(dense, report["val_auc"]), "collapse_threshold": threshold}
    after = [state.stats[s.name]["val_auc_after_extraction"] for s in stages
             if s.kind == "compress" and "val_auc_after_extraction" in state.stats.get(s.name, {})]
    if after:
        out["lift_lost_after_extraction"] = lift_lost(dense, after[-1])
    out["quality_collapse"] = out["lift_lost"] > threshold
    if out["quality_collapse"]:
        removed = list(report.get("features_removed", []))
        cause = {"features_removed": removed}
        if removed and state.dense.holds_tables:
            scores = mean_ablation_scores(state.dense, holdout_batches(ctx, state.dense))
            cause = importance_removed(scores, removed)
        out["quality_collapse_cause"] = cause
        named = ", ".join(f["name"] if isinstance(f, dict) else f for f in cause.get("features", removed)[:4])
        share = cause.get("share_of_importance")
        log.warning("quality collapse: validation AUC %.4f against the dense model's %.4f (%.0f%% of its lift over "
                    "chance lost; eval.collapse_threshold %.2f)%s", report["val_auc"], dense, 100 * out["lift_lost"],
                    threshold, f"; removed features {named} carried {100 * share:.0f}% of the held-out importance"
                    if share is not None and named else "")
    return out


def latency_report(state: RunState, cfg) -> dict:
    """The dense and the compressed model timed interleaved (`latency.compare_latency`), at
    `latency.threads`: medians, the per-round ratio with its spread, the thread count. Both as served: batch
    norm folded into its Linear, no dropout (`fold_batch_norm`)."""
    dense = state.dense
    gate, dense.dim_gate = dense.dim_gate, None  # time the dense model as served, without the training gate
    try:
        served = {"dense": fold_batch_norm(dense), "compressed": fold_batch_norm(state.model)}
        timing = compare_latency(served, cfg.latency.batches,
                                 cfg.latency.repeats, threads=cfg.latency.get("threads", 1), seed=cfg.seed)
    finally:
        dense.dim_gate = gate
    return {"dense": timing["ms"]["dense"], "compressed": timing["ms"]["compressed"],
            "ratio": timing["ratio"]["compressed"], "threads": timing["threads"], "repeats": timing["repeats"],
            "interleaved": True}


def kept_report(kept: Kept, slim: DLRM, dense: DLRMStructure) -> dict:
    """What survives, by name, read off the extracted model (neurons per layer, dims per table)."""
    s = slim.structure
    return {
        "features": (["dense"] if s.use_dense else []) + s.feature_names,
        "neurons": {name: m.out_features for name, m in slim.linear_layers().items()},
        # Width each table hands the interaction; `table_ranks`: its stored width where a projection follows.
        "dims": dict(zip(s.feature_names, s.table_dims)),
        "table_ranks": None if s.table_ranks is None else dict(zip(s.feature_names, s.table_ranks)),
        "layer_ranks": s.layer_ranks,
        "pairs": len(s.kept_pairs()) if s.interaction == "dot" else None,
        "dense_neurons": {f"dense.layers.{i}": w for i, w in enumerate(dense.bottom)}
        | {f"over.layers.{i}": w for i, w in enumerate(dense.top)},
    }
