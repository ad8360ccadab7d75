"""The report's figures, drawn from small real runs (`run.run`, what train.py calls): the data each figure
draws is read back off its matplotlib axes — the kept-groups curves with the extracted model's point, the
AUC-vs-ratio axes with a collapsed run kept apart, the dense line the table's control, the feature names."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import matplotlib
import pytest

from umec_lightning.report import build_report
from umec_lightning.report.figures import (
    COLLAPSED_Y,
    MIN_AUC_SPAN,
    MIN_RATIO_SPAN,
    auc_vs_ratio_figure,
    extracted_groups,
    kept_groups_figure,
    representative_runs,
)
from umec_lightning.report.rows import build_rows
from umec_lightning.report.runs import load_runs
from umec_lightning.report.sparsity_figures import feature_scores_figure

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Features a short run learns (tests/pipeline/test_input_selection.py), so that a tight input budget really
# collapses the model; log_every_n_steps above the compress stage's 24 steps.
LEARNABLE = ["data.cardinalities=[" + ",".join(["3", "5", "8", "12", "20", "30", "40", "50"] * 3 + ["6", "9"]) + "]",
             "data.main_effect_scale=0.8", "data.rare_shrink=0", "data.zipf_exponent=0.5"]
COMMON = [*LEARNABLE, "phases.pretrain_epochs=2", "phases.compress_epochs=1", "phases.finetune_epochs=1",
          "loader.limit_rows={train:3000,val:1000,test:1000}", "latency.batches=[1]", "latency.repeats=1",
          "log_every_n_steps=50"]
RUNS = {
    # Two equal-epochs controls of seed 0: the table matches each run to the one with its phase epochs; the
    # longer one comes first by path (where the old figure line took its value from).
    "a_control_longer": ["mode=dense_control", "phases.finetune_epochs=2"],
    "control": ["mode=dense_control"],
    "joint": ["mode=joint", "budget.flops=0.5"],
    "joint_longer": ["mode=joint", "budget.flops=0.5", "phases.finetune_epochs=2"],
    "magnitude": ["mode=magnitude", "budget.flops=0.5"],
    "is_09": ["mode=input_selection", "budget.flops=0.9"],
    "is_001": ["mode=input_selection", "budget.flops=0.01"],  # one input feature left: collapses
}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, dict[str, dict]]:
    from tests.pipeline.conftest import compose_cfg
    from umec_lightning.run import run

    root = tmp_path_factory.mktemp("sweep")
    cache = tmp_path_factory.mktemp("cache")
    return root, {name: run(compose_cfg([*COMMON, *o], cache), root / name) for name, o in RUNS.items()}


@pytest.fixture(scope="module")
def rows(sweep):
    return build_rows(load_runs(sweep[0]))


def _row(rows, name: str):
    return next(r for r in rows if any(run.path.name == name for run in r.runs))


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_a_stage_shorter_than_the_logging_interval_still_has_its_first_and_last_step(sweep):
    root, summaries = sweep
    steps = summaries["joint"]["stages"]["compress"]["steps"]
    assert steps < 50  # shorter than log_every_n_steps
    history = json.loads((root / "joint" / "sparsity_history.json").read_text())["history"]
    assert [h["step"] for h in history] == [1, steps]
    assert history[-1]["kept/features"] < history[0]["kept/features"]  # the end is where ADMM pruned to


def test_kept_groups_end_each_curve_at_what_the_extraction_kept(sweep, rows):
    root, summaries = sweep
    chosen = {row.mode: (row, run, hist) for row, run, hist in representative_runs(rows)}
    assert set(chosen) == {"joint", "input_selection"}
    fig = kept_groups_figure(list(chosen.values()))
    row, run, hist = chosen["joint"]
    ax = next(a for a in fig.axes if a.get_title().startswith(row.short_label))
    kept = run.summary["kept"]
    dense = kept["dense_neurons"]
    # What the extracted model keeps of each set, over the set's dense count, read off the summary by hand.
    expected = {
        "kept/features": len(kept["features"]) / hist[0]["kept/features"],
        "kept/neurons:dense.layers.0": kept["neurons"]["dense.layers.0"] / dense["dense.layers.0"],
        "kept/neurons:over.layers.0": kept["neurons"]["over.layers.0"] / dense["over.layers.0"],
        "kept/dims": next(iter(kept["dims"].values())) / hist[0]["kept/dims"],  # `dot`: one width; dim_block 1
    }
    stars = {line.get_gid().removeprefix("extracted:"): line for line in ax.lines
             if (line.get_gid() or "").startswith("extracted:")}
    assert set(stars) == set(expected)
    for key, frac in expected.items():
        assert list(stars[key].get_xdata()) == [hist[-1]["step"]], key  # at the curve's end
        assert stars[key].get_ydata()[0] == pytest.approx(frac), key
    # The point: the masks ADMM ended with are not the model (the extraction restored groups here).
    admm_end = {k: hist[-1][k] / hist[0][k] for k in expected}  # the first step keeps every group
    assert any(admm_end[k] != pytest.approx(expected[k]) for k in expected), (admm_end, expected)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    n_features = len(kept["features"])
    assert f"features ({hist[-1]['kept/features']:.0f} → {n_features}/27)" in labels
    assert "extracted model" in labels
    # kept.json (the extraction's own record) says the same as summary.json.
    without = replace(run, summary={k: v for k, v in run.summary.items() if k != "kept"})
    assert extracted_groups(without, expected) == extracted_groups(run, expected)
    assert extracted_groups(run, expected)["kept/features"] == n_features


def test_auc_vs_ratio_draws_a_collapsed_run_apart(sweep, rows):
    root, summaries = sweep
    collapsed = summaries["is_001"]
    assert collapsed["quality_collapse"] is True and collapsed["test_auc"] < 0.55
    healthy = [s for name, s in summaries.items() if name.startswith(("joint", "magnitude", "is_09"))]
    assert all(not s["quality_collapse"] and s["test_auc"] > 0.75 for s in healthy)
    ax = auc_vs_ratio_figure(rows, "t").axes[0]
    lo, hi = ax.get_ylim()
    assert lo > collapsed["test_auc"]  # the collapsed run does not stretch the AUC axis
    for s in healthy:
        assert lo < s["test_auc"] < hi
    assert hi - lo < 0.2  # readable: the healthy points are not squashed into a line
    marks = [line for line in ax.lines if line.get_gid() == "collapsed"]
    assert len(marks) == 1
    assert list(marks[0].get_xdata()) == [collapsed["flops_ratio"]]
    assert list(marks[0].get_ydata()) == [COLLAPSED_Y]  # axes fraction: at the bottom edge
    assert any(f"AUC {collapsed['test_auc']:.3f}" in t.get_text() for t in ax.texts)
    # The input_selection series' point is its healthy run only.
    drawn = {c.get_label(): c.lines[0] for c in ax.containers}
    series = drawn[next(k for k in drawn if k.startswith("input_selection"))]
    assert list(series.get_ydata()) == [summaries["is_09"]["test_auc"]]


def test_auc_vs_ratio_keeps_a_readable_ratio_span_at_one_budget(rows):
    at_budget = [r for r in rows if r.budget == (("flops", 0.5),) and r.mode == "magnitude"]
    ax = auc_vs_ratio_figure(at_budget, "t").axes[0]
    ratio = at_budget[0].runs[0].summary["flops_ratio"]
    assert abs(ratio - 0.5) < 0.005  # the ratio is the budget, to its last percent
    lo, hi = ax.get_xlim()
    assert hi - lo >= MIN_RATIO_SPAN
    assert lo < ratio < 0.5 < hi
    assert [line.get_xdata()[0] for line in ax.lines if line.get_gid() == "budget"] == [0.5]
    ylo, yhi = ax.get_ylim()
    assert yhi - ylo >= MIN_AUC_SPAN


def test_the_dense_line_is_the_control_the_table_uses(sweep, rows):
    root, summaries = sweep
    control, longer = summaries["control"]["test_auc"], summaries["a_control_longer"]["test_auc"]
    assert control != longer
    same_epochs = [_row(rows, name) for name in ("joint", "magnitude", "is_09", "is_001")]
    for row in same_epochs:
        assert [ref[1] for ref in row.refs] == [control]  # what the table's ΔAUC used
    ax = auc_vs_ratio_figure(same_epochs, "t").axes[0]
    lines = [line for line in ax.lines if line.get_gid() == "reference"]
    assert [line.get_ydata()[0] for line in lines] == [control]
    assert lines[0].get_label() == f"dense_control (equal epochs): {control:.4f} (n=1)"
    # A run with other phase epochs is compared with the other control: each line names the rows it is for.
    ax = auc_vs_ratio_figure(rows, "t").axes[0]
    lines = {line.get_ydata()[0]: line.get_label() for line in ax.lines if line.get_gid() == "reference"}
    assert set(lines) == {control, longer}
    assert lines[longer] == (f"dense_control (equal epochs): {longer:.4f} (n=1)\n"
                             "for joint · phases.finetune_epochs=2 flops=0.5")
    assert lines[control].startswith(f"dense_control (equal epochs): {control:.4f} (n=1)\nfor input_selection")
    assert lines[control].endswith("+2 more")  # the other four rows
    report = build_report(root, root.parent / "report")
    joint = next(ln for ln in report["report"].read_text().splitlines()
                 if ln.startswith("| joint (UMECMethod) · phases.finetune_epochs=1 |"))
    assert f"| {summaries['joint']['test_auc'] - control:+.4f}" in joint  # the table's ΔAUC: the same control
    assert [p.name for p in report["figures"]] == ["auc_vs_ratio.png", "kept_groups.png", "auc_vs_features.png"]


def test_feature_scores_name_every_feature(sweep):
    root, summaries = sweep
    summary = summaries["is_09"]
    assert (root / "is_09" / "feature_scores.png").stat().st_size > 1000  # the callback drew it
    history = json.loads((root / "is_09" / "sparsity_history.json").read_text())["history"]
    fig = feature_scores_figure(history, summary["noise_features"])
    bars = fig.axes[1]
    names = [t.get_text() for t in bars.get_yticklabels()]
    assert sorted(names) == sorted(summary["kept"]["features"] + summary["features_removed"])
    assert len(names) == 27 and "dense" in names and "C26" in names
    last = history[-1]
    widths = [p.get_width() for p in bars.patches]
    assert widths == [last[f"feature_score/{n}"] for n in names]
    assert widths == sorted(widths, reverse=True)  # the lowest score, pruned first, at the top
    noise, pruned = set(summary["noise_features"]), set(last["pruned_features"])
    assert pruned  # ADMM prunes some at its end
    for patch, name in zip(bars.patches, names):
        assert (patch.get_facecolor()[:3] == matplotlib.colors.to_rgb("tab:red")) == (name in noise), name
        assert (patch.get_hatch() == "///") == (name in pruned), name
