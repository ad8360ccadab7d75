"""The two quantization stage kinds (`quant/`: row-wise tables, fp16 Linears; `quant.plan`: how widths are chosen).

    bits       decide the stored widths (`tables: 8 | 4 | 16 | 32 | auto | {feature: width}`, `dense: 32 | 16`,
               `tolerance` for auto) on the model handed on, usually the pretrained dense one; hands the same
               model on with the plan. Under `budget.bytes` the compress stages after it prune to the params
               fraction the plan leaves (`quant.plan.params_budget`).
    quantize   store the model handed on as the plan says (batch norm folded first: the model as served), complete
               to `budget.bytes` by lowering table widths where a file the run serves (compressed.pt, each
               export; `quant.served`) would be over it, and evaluate the quantized model. The last stage: its
               weights are codes, nothing trains after it.

A `finetune` stage with `qat: true` between them trains with every looked-up row fake-quantized at the plan's
widths (`quant.aware`), so the model learns the values it will serve.

Under trainer=torchrec the tables train sharded and rank 0 holds them whole (the tables of record, gathered after
every fit): `bits` decides there (`auto` probes rank 0's model) and hands every rank the same plan, and `quantize`
stores and evaluates rank 0's model in that one process, over the whole of each split (quantized tables have no
sharded training form: nothing trains after this stage, and a server loads the whole quantized model). A `qat`
finetune needs the tables in the process and is refused there before work (`run.check_config`).
"""

from __future__ import annotations

import logging
from functools import partial

from ..config import ConfigError
from ..distributed import from_rank_zero
from ..io import write_json
from ..models.serve import fold_batch_norm
from ..quant import served
from ..quant.apply import model_bytes
from ..quant.plan import BitsPlan, apply_plan, choose_plan, complete_to_budget, planned_bytes
from ..run_dir import launched_rank_zero
from .plan import Stage
from .training import RunContext, holdout_batches, measure_in_process, measure_metrics

log = logging.getLogger(__name__)

HOLDOUT_BATCHES = 4  # validation batches the held-out probes average over
ROUNDS = 3  # measurements of the served files' own bytes a completion may take (`_complete`)


def bits_stage(ctx: RunContext, stage: Stage, given):
    """Decide the plan (`quant.plan.choose_plan`) on the model handed on; hand the same model on with it."""
    from .runners import StageResult  # here: runners registers these stages

    marker = ctx.finished(stage.name)
    if marker:
        plan = BitsPlan.from_dict(marker["bits"])
    else:
        opts = stage.options

        def choose() -> BitsPlan:
            batches = holdout_batches(ctx, given.model, HOLDOUT_BATCHES) if opts["tables"] == "auto" else []
            return choose_plan(given.model, opts["tables"], opts["dense"], batches, opts["tolerance"])

        # One plan for every rank: under trainer=torchrec only rank 0 holds the tables an `auto` probe needs.
        plan = from_rank_zero(choose)
    figures = {"bits": plan.to_dict(),
               "planned_bytes_ratio_of_dense": planned_bytes(given.dense, plan) / model_bytes(given.dense)["total"]}
    if plan.how == "auto":
        counts = {w: sum(1 for v in plan.tables.values() if v == w) for w in sorted(set(plan.tables.values()))}
        log.info("bits: held-out Δlogloss of post-training quantization %s -> tables at %s",
                 {w: round(d, 5) for w, d in plan.probe.items()},
                 ", ".join(f"{n} at {w} bits" for w, n in counts.items()))
    if not marker and launched_rank_zero():
        write_json(ctx.phase_marker(stage.name), figures)
    return StageResult(stage.name, given.model, given.kept, figures, metrics=None, compressed=False, bits=plan)


def quantize_stage(ctx: RunContext, stage: Stage, given):
    """Store the model handed on as its plan says, within `budget.bytes` where set; evaluate the stored model."""
    from .runners import StageResult  # here: runners registers these stages

    cfg = ctx.cfg
    if given.bits is None:
        raise ConfigError(f"config key `mode.stages`: stage {stage.name} (quantize) needs a `bits` stage before it")
    if not given.model.holds_tables:
        # trainer=torchrec, a rank but 0: rank 0 stores, evaluates and saves the quantized tables of record alone.
        return StageResult(stage.name, given.model, given.kept, {}, {}, compressed=True, bits=given.bits)
    as_served = fold_batch_norm(given.model)
    plan, forced, files = given.bits.on(as_served), [], {}
    budget = cfg.budget.get("bytes")
    dense_bytes = model_bytes(given.dense)["total"]
    if budget is not None:
        plan, forced, files = _complete(ctx, as_served, given.kept, plan, float(budget) * dense_bytes)
        if forced:
            log.warning("quantize: the served files were over budget.bytes=%s at the planned widths; lowered %d "
                        "width(s) to meet it (%s)", budget, len(forced),
                        ", ".join(f"{s['table']} {s['from']}→{s['to']}" for s in forced[:4]))
    model = apply_plan(as_served, plan)
    stored = model_bytes(model)
    figures = {"bits": plan.to_dict(), "stored_bytes": stored, "stored_bytes_ratio": stored["total"] / dense_bytes,
               "forced_widths": forced}
    if files:
        figures["served_bytes_estimate"] = files
    one_process = cfg.trainer.strategy == "torchrec"  # DMP shards float tables only: rank 0 evaluates it whole
    metrics = (measure_in_process if one_process else measure_metrics)(ctx, model, stage.name)
    return StageResult(stage.name, model, given.kept, figures, metrics, compressed=True, bits=plan)


def _complete(ctx: RunContext, served_model, kept, plan: BitsPlan, limit: float):
    """(plan, forced steps, {format: estimated file bytes}): `plan` with widths lowered until every file the run
    serves (`quant.served`: compressed.pt and each export) is estimated within `limit` bytes. The formats' own bytes
    are measured at the plan and again after each completion changed it (a width change can add a fused group's
    tensors), with at most ROUNDS completions; the estimate returned is of the final plan."""
    formats = served.served_formats(ctx.cfg)
    forced, batches = [], None
    for completions in range(ROUNDS + 1):
        overheads = served.format_overheads(served_model, plan, formats, kept)
        bytes_of = partial(served.largest_served, overheads=overheads)
        if completions == ROUNDS or bytes_of(served_model, plan) <= limit:
            break
        batches = batches if batches is not None else holdout_batches(ctx, served_model, HOLDOUT_BATCHES)
        plan, steps = complete_to_budget(served_model, plan, limit, batches, bytes_of)
        forced += steps
        if not steps:  # every width at its lowest: reported unmet (summary.json budget_met)
            break
    return plan, forced, served.served_bytes(served_model, plan, overheads)
