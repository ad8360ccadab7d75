"""The stage kinds. Each is a function `(ctx, stage, given: StageInput) -> StageResult`: it takes the model the
previous stage handed on and returns what it hands on (its model and what that keeps of the dense one) with its
figures and metrics. Nothing travels through the LightningModule or shared state; `run` folds the results.

    pretrain   train the dense model (or load `pretrained=`), evaluate it: the reference of every comparison
    compress   a compression method trains (or not: 0 epochs for one-shot methods) and ends; its `Compression`
               callback turns the outcome into a physically smaller model
    finetune   train the current (extracted) model, keep its best-on-validation weights (`qat: true`: with its
               tables' looked-up rows fake-quantized at the planned widths, `quant.aware`)
    bits, quantize   the stored widths, decided then applied (`stages.quantize`)
    scratch    the method decides a structure from the dense one before any training; a fresh model of
               that structure trains from scratch (handcrafted narrow MLPs)

Every finished stage leaves a marker (`phases/<name>.json`), so `resume=true` skips it. Compress stages never stop
early (the method's schedule is their length), nor scratch ones (the equal-epochs control).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

from ..callbacks.compression import Compression
from ..callbacks.finetune import Finetune
from ..compressed import read_compressed, save_compressed
from ..compression.compose import compose_kept
from ..compression.extract import extracted_structure
from ..compression.kept import Kept
from ..config import init_scheme
from ..io import write_json
from ..models import DLRM
from ..models.family import family_of_model
from ..module import CTRModule
from ..quant import served
from ..quant.aware import fake_quantize_tables, remove_hooks
from ..quant.plan import param_weights, params_budget, row_weights
from .plan import EARLY_STOPPING_KINDS, Stage, relative_budget, stage_budget
from .pretrained import load_pretrained
from .quantize import bits_stage, quantize_stage
from .training import (
    RunContext,
    evaluate,
    fit_phase,
    holdout_batches,
    make_module,
    make_trainer,
    measure_metrics,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageInput:
    """What a stage starts from: the dense model of the run (and its measured cost), the model the previous stage
    handed on and what that keeps of the dense one."""

    dense: DLRM
    dense_cost: object  # models.Cost of `dense`
    model: DLRM
    kept: Kept
    bits: object | None = None  # quant.plan.BitsPlan: the stored widths a `bits` stage decided, None before one

    def after(self, result: StageResult) -> StageInput:
        return replace(self, model=result.model, kept=result.kept, bits=result.bits or self.bits)


@dataclass
class StageResult:
    """What a stage hands on and reports.

    figures: the stage's own figures for summary.json (epochs run, throughput, the method's figures, ...);
    metrics: val_*/test_* of `model` as handed on, None when its weights changed after the last evaluation;
    compressed: the stage made the model smaller (a run that has one reports compression);
    same_epochs: the shared reference's equal-epochs control (pretrain, with `reference.dir`);
    feature_order: input features in the order the stage's method first pruned them."""

    name: str
    model: DLRM
    kept: Kept
    figures: dict
    metrics: dict | None
    compressed: bool
    same_epochs: dict | None = None
    feature_order: list[str] = field(default_factory=list)
    bits: object | None = None  # a `bits` stage's plan (quant.plan.BitsPlan), handed on to the stages after it


def split_metrics(figures: dict) -> tuple[dict, dict]:
    """(the figures that are not metrics, the val_*/test_* metrics)."""
    metrics = {k: v for k, v in figures.items() if k.startswith(("val_", "test_"))}
    return {k: v for k, v in figures.items() if k not in metrics}, metrics


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


def pretrain_stage(ctx: RunContext, stage: Stage, given: StageInput) -> StageResult:
    """Pretrain (or load) the dense model and measure it: the reference of every comparison."""
    cfg = ctx.cfg
    module = make_module(ctx, given.model, stage.name)
    path, stats, same_epochs = cfg.pretrained, {}, None
    if not path and ctx.reference is not None:
        # The shared dense run's pretrain point (trained now if no run has yet) and its equal-epochs control.
        record = ctx.reference.ensure(ctx, given.model)
        path, stats = record["pretrain_checkpoint"], {"dense_reference": record["key"]}
        same_epochs = record["same_epochs"][str(ctx.reference.epochs)]
    if path:
        load_pretrained(given.model, path, cfg.model.name, cfg.data.name)  # also when resuming: no weights in markers
        trainer = make_trainer(ctx, module, 0, [], select_on_val=False)
        stats = {"pretrained": path, **stats}
        if trainer.is_global_zero:
            write_json(ctx.phase_marker(stage.name), stats)
        figures = {**stats, **evaluate(trainer, module, ctx)}
    else:
        figures = train_and_evaluate(ctx, module, stage, [])
    figures, metrics = split_metrics(figures)
    return StageResult(stage.name, given.model, given.kept, figures, metrics, compressed=False,
                       same_epochs=same_epochs)


def compress_stage(ctx: RunContext, stage: Stage, given: StageInput) -> StageResult:
    """The method trains for the stage's epochs; its `Compression` callback builds the smaller model."""
    cfg = ctx.cfg
    extracted_path = ctx.checkpoint_dir(stage.name) / "extracted.pt"
    marker = ctx.finished(stage.name)  # the stage's figures when resuming a run that finished it, else None
    if marker:
        stored = read_compressed(extracted_path, hold_tables=given.model.holds_tables)
        model, kept, stats = stored.model, stored.kept, marker
    else:
        method = stage.make_method()
        reserve = None
        if given.bits is not None and cfg.budget.get("bytes") is not None:
            # The pruning prices parameters by their planned storage (`compression.resource.table_param_weights`),
            # and leaves room for the served files' own bytes on the largest layout it may end with.
            plan = given.bits.on(given.model)
            reserve = served.method_reserve(cfg, method, given.model, plan)
            given.model.table_param_weights, given.model.table_row_weights = param_weights(plan), row_weights(plan)
            method.layout_budgets = _layout_budgets(cfg, stage, given, plan)
        budgets = _budgets(cfg, stage, given, reserve)
        if reserve is not None:
            log.info("%s: budget.bytes=%s is a params budget of %.4f of the stage's input, priced by storage (%d "
                     "bytes held back for the served files' own bytes)", stage.name, cfg.budget.bytes,
                     budgets["params"], reserve)
        forced = _importance_the_budget_forces(ctx, method, given.model, budgets)
        method.setup(given.model, budgets)  # before the optimizer exists: it may add parameters
        suffix = "" if stage.name == "compress" else f"_{stage.name}"
        compression = Compression(method, cfg.log_every_n_steps, record_dir=ctx.run_dir, suffix=suffix)
        module = make_module(ctx, given.model, stage.name, compression=compression)
        trainer, stats = fit_phase(ctx, module, stage.epochs, [], select_on_val=False, max_steps=stage.steps)
        extracted = compression.extracted
        stats.update(extracted.info)
        stats["budget_of_input_model"] = budgets
        if reserve is not None:
            stats["served_files_reserve_bytes"] = reserve
        if forced is not None:
            stats["budget_forces_importance"] = forced
        # What the surgery alone did, before any finetune (the collapse guard's first look).
        after = measure_metrics(ctx, extracted.model, stage.name, splits=("val",))
        stats.update({f"{k}_after_extraction": v for k, v in after.items()})
        stats["feature_pruning_order"] = _removal_order(compression.history)
        model = extracted.model
        for priced in ("table_param_weights", "table_row_weights"):
            given.model.__dict__.pop(priced, None)
        kept = compose_kept(given.kept, extracted.kept, given.model.structure, given.dense.structure)
        if trainer.is_global_zero:
            save_compressed(extracted_path, model, kept, {"phase": stage.name})
            write_json(ctx.phase_marker(stage.name), stats)
    # The weights changed: no metrics measured so far are this model's.
    return StageResult(stage.name, model, kept, stats, metrics=None, compressed=True,
                       feature_order=list(stats.get("feature_pruning_order", [])))


def _budgets(cfg, stage: Stage, given: StageInput, reserve: int | None) -> dict[str, float]:
    """The compress stage's budgets as fractions of its input model; with `reserve` (bytes held back for the served
    files' own bytes) budget.bytes becomes the params share it leaves (`quant.plan.params_budget`)."""
    as_params = None if reserve is None else params_budget(given.dense, given.bits, float(cfg.budget.bytes), reserve)
    return relative_budget(stage_budget(cfg, stage, as_params), given.dense_cost, given.model)


def _layout_budgets(cfg, stage: Stage, given: StageInput, plan):
    """(model, kept) -> (the stage's budgets, the reserve): `_budgets` once the served files' own bytes of `kept`'s
    layout itself (not the largest one's) are held back (`CompressionMethod.layout_budgets`)."""
    formats = served.served_formats(cfg)

    def layout_budgets(model, kept) -> tuple[dict, int]:
        own = served.reserve_bytes(served.layout(model, kept), plan, formats, spread=False)
        return _budgets(cfg, stage, given, own), own

    return layout_budgets


def finetune_stage(ctx: RunContext, stage: Stage, given: StageInput) -> StageResult:
    """Train the extracted model; `fit_phase` ends it on its best-on-validation weights. With `qat`, every
    looked-up table row is fake-quantized at the planned widths while it trains and evaluates (`quant.aware`)."""
    module = make_module(ctx, given.model, stage.name)
    hooks = fake_quantize_tables(given.model, given.bits.on(given.model).tables) if stage.options.get("qat") else []
    try:
        start = _qat_start(ctx, stage, given.model) if hooks else None
        figures, metrics = split_metrics(train_and_evaluate(ctx, module, stage, [Finetune()]))
        if start is not None and metrics.get("val_auc", 0.0) < start[0]:
            # No epoch of training beat the model it started from (fake-quantized) on validation: a model that had
            # converged and then overfits (a small data set) is better served as it was. The stage's best-on-val
            # selection, with the starting point as one more candidate.
            given.model.load_state_dict(start[1])
            figures["qat_kept_start"] = True
            figures, metrics = {**figures, "qat_trained_val_auc": metrics["val_auc"]}, None
    finally:
        remove_hooks(hooks)
    if hooks:  # its metrics are the fake-quantized model's; the float one it hands on is not what was measured
        figures = {**figures, **{f"qat_{k}": v for k, v in (metrics or {}).items()}}
        metrics = None
    return StageResult(stage.name, given.model, given.kept, figures, metrics, compressed=False)


def _qat_start(ctx: RunContext, stage: Stage, model) -> tuple[float, dict] | None:
    """(validation AUC, a copy of the weights) of the model a quantization-aware finetune starts from, measured
    with its hooks on; None when resuming a finished stage (its marker decided already)."""
    if ctx.finished(stage.name):
        return None
    val = measure_metrics(ctx, model, f"{stage.name}_start", splits=("val",))["val_auc"]
    return val, {k: v.detach().clone() for k, v in model.state_dict().items()}


def scratch_stage(ctx: RunContext, stage: Stage, given: StageInput) -> StageResult:
    """The method's structure, decided before any training, trained from scratch (fresh initial weights)."""
    cfg, dense = ctx.cfg, given.dense
    method = stage.make_method()
    method.setup(dense, relative_budget(stage_budget(cfg, stage), given.dense_cost, dense))
    outcome = method.finish(dense)
    model = family_of_model(dense).build(extracted_structure(dense, outcome.kept),
                                         sparse_grad=bool(cfg.model.sparse_grad), seed=cfg.seed,
                                         hold_tables=dense.holds_tables, init=init_scheme(cfg))
    module = make_module(ctx, model, stage.name)
    figures, metrics = split_metrics(train_and_evaluate(ctx, module, stage, []))
    return StageResult(stage.name, model, outcome.kept, {**figures, **outcome.info}, metrics, compressed=True)


STAGE_RUNNERS = {"pretrain": pretrain_stage, "compress": compress_stage, "finetune": finetune_stage,
                 "scratch": scratch_stage, "bits": bits_stage, "quantize": quantize_stage}


def run_stage(ctx: RunContext, stage: Stage, given: StageInput) -> StageResult:
    return STAGE_RUNNERS[stage.kind](ctx, stage, given)


def _importance_the_budget_forces(ctx: RunContext, method, model: DLRM, budgets: dict) -> dict | None:
    """For a method that removes input features only (input_selection): the held-out importance share the budget
    forces out at least (`collapse.importance_a_budget_forces`), said before any training when it is most of it.
    None for other methods, or where this process does not hold the tables (trainer=torchrec's ranks but 0)."""
    if set(method.kinds) != {"feature"} or not model.holds_tables:
        return None
    from ..compression.ablation import mean_ablation_scores
    from ..compression.collapse import importance_a_budget_forces

    forced = importance_a_budget_forces(model, mean_ablation_scores(model, holdout_batches(ctx, model)), budgets)
    if forced is not None and forced["share_of_importance"] > 0.5:
        names = ", ".join(f["name"] for f in forced["features"][:4])
        log.warning("this budget can only be met by removing input features that carry at least %.0f%% of the "
                    "dense model's held-out importance (%s): expect a much worse model, or raise the budget",
                    100 * forced["share_of_importance"], names)
    return forced


def _removal_order(history: list[dict]) -> list[str]:
    """Features in the order the method first pruned them (from the logged history)."""
    order: list[str] = []
    for record in history:
        order += [f for f in record.get("pruned_features", []) if f not in order]
    return order
