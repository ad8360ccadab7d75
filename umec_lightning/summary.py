"""summary.json of a compressing run, from its stages' results, and the console table read off it.

Every figure about the compressed model is measured on the extracted model itself: its FLOPs, params and bytes
(`models.measure`), its metrics, its latency against the dense model's (timed interleaved), and the collapse guard
(`compression.collapse`): the share of the dense model's validation lift over chance it lost.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .compression import Kept
from .config import collapse_threshold
from .latency import compare_latency
from .models import DLRM, DLRMStructure, fold_batch_norm, measure
from .quant.apply import model_bytes
from .stages import RunContext, StageInput, StageResult, holdout_batches, measure_metrics

log = logging.getLogger(__name__)


def final_metrics(ctx: RunContext, results: list[StageResult]) -> dict:
    """The final model's val/test metrics: the last stage's, or measured now if it changed the weights after."""
    last = results[-1]
    return last.metrics if last.metrics is not None else measure_metrics(ctx, last.model, "final")


def feature_order(results: list[StageResult]) -> list[str]:
    """Input features in the order the run's methods first pruned them, stage after stage."""
    order: list[str] = []
    for result in results:
        order += [f for f in result.feature_order if f not in order]
    return order


def compression_report(ctx: RunContext, start: StageInput, results: list[StageResult], structure: DLRMStructure,
                       meta) -> dict:
    """Every figure about the compressed model (`results[-1].model`), measured on the extracted model itself,
    against the dense one (`start.dense`, measured by the first stage)."""
    cfg = ctx.cfg
    final, pretrain = results[-1], results[0]
    dense_cost, cost = start.dense_cost, measure(final.model)
    budget = {k: float(cfg.budget[k]) for k in ("flops", "params", "bytes") if cfg.budget.get(k) is not None}
    stored, dense_stored = served_bytes(final.model), served_bytes(start.dense)
    ratios = {"flops": cost.flops / dense_cost.flops, "params": cost.params / dense_cost.params,
              "bytes": stored["total"] / dense_stored["total"]}
    report = {f"dense_{k}": v for k, v in pretrain.metrics.items()}
    report.update(final_metrics(ctx, results))
    for metric in ("auc", "logloss"):  # logloss too: a CTR model's calibration is what bidding uses
        if f"test_{metric}" in report and f"dense_test_{metric}" in report:
            report[f"delta_test_{metric}"] = report[f"test_{metric}"] - report[f"dense_test_{metric}"]
    if pretrain.same_epochs is not None:  # the fair control: the dense model trained as many epochs in all
        same = pretrain.same_epochs
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
        # What a server stores, by storage type (quantized tables by their codes, scales and biases; fp16 weights
        # at 2 bytes), of both models as served (batch norm folded): `budget.bytes` is met on this.
        "stored_bytes": stored,
        "dense_stored_bytes": dense_stored,
        "bytes_ratio": ratios["bytes"],
        # The share of the dense model's FLOPs/params removed (0.0: nothing pruned). Not "compression_ratio": a 0.0
        # there read as "compressed to nothing" (issue 24).
        "reduction": {k: 1 - ratios[k] for k in ("flops", "params")},
        # None when no budget was set (group lasso cannot target one): nothing to meet.
        "budget_met": all(ratios[k] <= b + 1e-12 for k, b in budget.items()) if budget else None,
        "kept": kept_report(final.kept, final.model, start.dense),
        **feature_report(final.kept, structure, meta),
        "feature_pruning_order": feature_order(results),
        "pretrain": pretrain.figures,
        "stages": {r.name: r.figures for r in results[1:]},
        "compressed_path": str(ctx.run_dir / "compressed.pt"),
        # Rank 0 times the models (a sharded run's other ranks hold no tables; rank 0 writes the summary).
        "latency_ms": latency_report(start.dense, final.model, cfg) if final.model.holds_tables else None,
    })
    report.update(collapse_report(ctx, start.dense, results, report))
    return report


def served_bytes(model) -> dict:
    """`quant.apply.model_bytes` of the model as served (batch norm folded into its Linear)."""
    return model_bytes(fold_batch_norm(model) if model.dim_gate is None else model)


def collapse_report(ctx: RunContext, dense_model: DLRM, results: list[StageResult], report: dict) -> dict:
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
    after = [r.figures["val_auc_after_extraction"] for r in results if "val_auc_after_extraction" in r.figures]
    if after:
        out["lift_lost_after_extraction"] = lift_lost(dense, after[-1])
    out["quality_collapse"] = out["lift_lost"] > threshold
    if out["quality_collapse"]:
        removed = list(report.get("features_removed", []))
        cause = {"features_removed": removed}
        if removed and dense_model.holds_tables:
            scores = mean_ablation_scores(dense_model, holdout_batches(ctx, dense_model))
            cause = importance_removed(scores, removed)
        out["quality_collapse_cause"] = cause
        named = ", ".join(f["name"] if isinstance(f, dict) else f for f in cause.get("features", removed)[:4])
        share = cause.get("share_of_importance")
        log.warning("quality collapse: validation AUC %.4f against the dense model's %.4f (%.0f%% of its lift over "
                    "chance lost; eval.collapse_threshold %.2f)%s", report["val_auc"], dense, 100 * out["lift_lost"],
                    threshold, f"; removed features {named} carried {100 * share:.0f}% of the held-out importance"
                    if share is not None and named else "")
    return out


def latency_report(dense: DLRM, model: DLRM, cfg) -> dict:
    """The dense and the compressed model timed interleaved (`latency.compare_latency`), at
    `latency.threads`: medians, the per-round ratio with its spread, the thread count. Both as served: batch
    norm folded into its Linear, no dropout (`fold_batch_norm`)."""
    gate, dense.dim_gate = dense.dim_gate, None  # time the dense model as served, without the training gate
    try:
        served = {"dense": fold_batch_norm(dense), "compressed": fold_batch_norm(model)}
        timing = compare_latency(served, cfg.latency.batches,
                                 cfg.latency.repeats, threads=cfg.latency.get("threads", 1), seed=cfg.seed)
    finally:
        dense.dim_gate = gate
    return {"dense": timing["ms"]["dense"], "compressed": timing["ms"]["compressed"],
            "ratio": timing["ratio"]["compressed"], "threads": timing["threads"], "repeats": timing["repeats"],
            "interleaved": True}


def kept_report(kept: Kept, slim, dense) -> dict:
    """What survives, by name, read off the extracted model `slim` (neurons per layer, dims per table), with the
    dense model's layer widths beside it."""
    s = slim.structure
    return {
        "features": (["dense"] if s.use_dense else []) + s.feature_names,
        "neurons": {name: m.out_features for name, m in slim.linear_layers().items()},
        # Width each table hands the interaction; `table_ranks`: its stored width where a projection follows.
        "dims": dict(zip(s.feature_names, s.table_dims)),
        "table_ranks": None if s.table_ranks is None else dict(zip(s.feature_names, s.table_ranks)),
        "layer_ranks": s.layer_ranks,
        "pairs": len(s.kept_pairs()) if s.interaction == "dot" else None,
        "dense_neurons": {name: m.out_features for name, m in dense.linear_layers().items()},
    }


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
        for key in ("flops", "params", "bytes"):
            if f"{key}_ratio" not in summary:  # summaries written before stored bytes were reported
                continue
            note = f"budget {budget[key]:g}" if key in budget else ""
            if key == "bytes":
                note = ("stored, " + note) if note else "stored"
            rows.append((f"{key} / dense", f"{summary[f'{key}_ratio']:>9.3f}", note))
        if summary.get("file_bytes_ratio"):  # the files a server loads (export_report.files_report)
            largest, ratio = max(summary["file_bytes_ratio"].items(), key=lambda kv: kv[1])
            note = f"largest file ({largest}), budget {budget['bytes']:g}" if "bytes" in budget else \
                f"largest file ({largest})"
            rows.append(("file bytes / dense", f"{ratio:>9.3f}", note))
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
    if not reached and after:  # budget.bytes: the pruning stage's own budget was params (`stages.plan`)
        reached = ", ".join(f"{k} {v:.4f}" for k, v in after.items())
    quantize = [s for s in (summary.get("stages") or {}).values() if "forced_widths" in s]
    widths = f"; {len(quantize[-1]['forced_widths'])} width(s) lowered to meet bytes" \
        if quantize and quantize[-1]["forced_widths"] else ""
    if stats["budget_met_by"] == "admm":
        return f"{where}ADMM met its part ({reached}){widths}" if widths or "bytes" in (summary.get("budget") or {}) \
            else f"{where}ADMM met it ({reached})"
    forced = stats.get("forced_share_of_reduction")
    return (f"{where}ADMM reached {reached}; the extraction made {forced:.1%} of the reduction"
            if forced is not None else f"{where}ADMM reached {reached}")
