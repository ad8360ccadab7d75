"""The report's significance on the test rows (report/significance.py, the tie rule in report/markdown.py): summaries
as `run.py` writes them, each with a per-row predictions file written by `umec_lightning.predictions`; the expected
numbers are computed here from DeLong's full covariance matrix (`delong.delong`), not from the contrast code the
report uses."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from umec_lightning.predictions import read_predictions, write_predictions
from umec_lightning.report import build_report
from umec_lightning.report.delong import Z95, auc_interval, delong

from .test_report import compressed_summary, dense_summary, row_of, table, write

PAIRED = -2  # the paired-test column
INTERVAL = -3  # the exact AUC interval column


def sweep_with_predictions(root, rows: int, run_weight: float, seeds=(0, 1, 2), fingerprint: str = "fp",
                           mode: str = "joint", method: str = "UMECMethod", data_seed: int = 0) -> dict:
    """dense_control and `mode` runs per seed, all scored on the same `rows` test rows. The click depends on two
    signals a and b of each row; the control scores a + b, the compressed model a + run_weight·b (it lost part of
    b), each seed adding a little noise of its own (training noise). The gap is then the same for every seed, while
    which rows it shows on is what the test rows sample."""
    rng = np.random.default_rng(data_seed)
    a, b = rng.normal(size=rows), rng.normal(size=rows)
    labels = (rng.random(rows) < 1 / (1 + np.exp(-(a + b - 1)))).astype(np.uint8)
    out = {}
    for seed in seeds:
        srng = np.random.default_rng(100 + seed)
        for name, weight in (("control", 1.0), (mode, run_weight)):
            d = root / f"{name}_s{seed}"
            d.mkdir(parents=True, exist_ok=True)
            logit = a + weight * b + srng.normal(scale=0.05, size=rows)
            probs = (1 / (1 + np.exp(-logit))).astype(np.float32)
            path = write_predictions(d / "test_predictions_finetune.npz", labels, probs, fingerprint)
            auc = auc_interval(labels, probs).value
            summary = dense_summary(seed, auc) if name == "control" else \
                compressed_summary(mode, seed, auc, {"flops": 0.5}, method=method)
            (d / "summary.json").write_text(json.dumps({**summary, "test_predictions": str(path)}))
            out[(name, seed)] = (path, auc)
    return out


def p_text(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def expected_mean_delta(pairs: list[tuple]) -> tuple[float, float]:
    """Seed-mean ΔAUC and its variance w S w^T from the full DeLong covariance of all the models."""
    files = [read_predictions(p) for pair in pairs for p in pair]
    result = delong(files[0].label, *[f.prob for f in files])
    w = np.array([(1 if i % 2 == 0 else -1) / len(pairs) for i in range(len(files))])
    return float(w @ result.auc), float(w @ result.cov @ w)


def test_a_gap_beyond_the_seed_std_on_327_test_rows_is_a_tie_by_the_paired_test(tmp_path):
    """The Criteo sample's situation: 327 test rows, a consistent loss over seeds (|mean| well above the seed std,
    which the old rule called a difference), but the test rows cannot tell it from noise."""
    made = sweep_with_predictions(tmp_path / "runs", rows=327, run_weight=0.8)
    value, variance = expected_mean_delta([(made[("joint", s)][0], made[("control", s)][0]) for s in range(3)])
    p = math.erfc(abs(value) / math.sqrt(variance) / math.sqrt(2))
    deltas = [made[("joint", s)][1] - made[("control", s)][1] for s in range(3)]
    assert abs(np.mean(deltas)) > np.std(deltas, ddof=1)  # the seed rule alone: not a tie
    assert p >= 0.05  # the rows: no evidence
    report = build_report(tmp_path / "runs", tmp_path / "out")
    header, rows = table(report["report"])
    joint = row_of(rows, "joint", "flops=0.5")
    assert joint[8].endswith("(tie)")
    low, high = value - Z95 * np.sqrt(variance), value + Z95 * np.sqrt(variance)
    assert joint[PAIRED] == f"{value:+.4f} [{low:+.4f}, {high:+.4f}] {p_text(p)}"
    assert np.mean(deltas) == pytest.approx(value, abs=1e-6)  # the same AUCs: the summaries' are exact here
    text = report["report"].read_text()
    assert "DeLong's paired contrast test" in text and "p ≥ 0.05" in text


def test_a_clear_difference_on_many_rows_is_not_a_tie_and_the_interval_is_of_the_seed_mean(tmp_path):
    made = sweep_with_predictions(tmp_path / "runs", rows=20000, run_weight=0.3)
    value, variance = expected_mean_delta([(made[("joint", s)][0], made[("control", s)][0]) for s in range(3)])
    header, rows = table(build_report(tmp_path / "runs", tmp_path / "out")["report"])
    joint = row_of(rows, "joint", "flops=0.5")
    assert value < -0.02 and value + Z95 * np.sqrt(variance) < 0
    assert "(tie)" not in joint[8] and joint[PAIRED].endswith("p<0.001")
    # The AUC interval: the seed-mean of the three runs' exact AUCs, w = 1/3 each, with its DeLong variance.
    files = [read_predictions(made[("joint", s)][0]) for s in range(3)]
    result = delong(files[0].label, *[f.prob for f in files])
    w = np.full(3, 1 / 3)
    mean, se = float(w @ result.auc), float(np.sqrt(w @ result.cov @ w))
    assert joint[INTERVAL] == f"{mean:.4f} [{mean - Z95 * se:.4f}, {mean + Z95 * se:.4f}]"
    control = row_of(rows, "dense_control", "–")
    assert control[PAIRED] == "reference" and control[INTERVAL].startswith("0.")


def test_runs_on_other_rows_are_left_out_and_row_sets_per_seed_add_as_independent(tmp_path):
    root = tmp_path / "runs"
    made = sweep_with_predictions(root, rows=2000, run_weight=0.7, seeds=(0, 1))
    # Seed 2 was scored on another test split (other rows, other labels): its pair is paired on its own rows.
    other = sweep_with_predictions(root, rows=1500, run_weight=0.7, seeds=(2,), fingerprint="fp2", data_seed=5)
    made.update(other)
    header, rows = table(build_report(root, tmp_path / "out")["report"])
    joint = row_of(rows, "joint", "flops=0.5")
    v01, var01 = expected_mean_delta([(made[("joint", s)][0], made[("control", s)][0]) for s in (0, 1)])
    v2, var2 = expected_mean_delta([(made[("joint", 2)][0], made[("control", 2)][0])])
    # Seed-mean over the three: (2·v01 + v2)/3, variances of independent row sets add.
    value, variance = (2 * v01 + v2) / 3, (4 * var01 + var2) / 9
    assert joint[PAIRED].startswith(f"{value:+.4f} [{value - Z95 * np.sqrt(variance):+.4f}, "
                                    f"{value + Z95 * np.sqrt(variance):+.4f}]")
    assert "2 sets of test rows, added as independent" in joint[PAIRED]

    # A control whose predictions are on other rows than its run's: that seed is left out of the paired test.
    (root / "control_s2" / "test_predictions_finetune.npz").unlink()
    labels = read_predictions(made[("control", 0)][0]).label
    write_predictions(root / "control_s2" / "test_predictions_finetune.npz", labels[::-1].copy(),
                      np.linspace(0, 1, len(labels), dtype=np.float32), "fp")
    header, rows = table(build_report(root, tmp_path / "out")["report"])
    joint = row_of(rows, "joint", "flops=0.5")
    assert joint[PAIRED].startswith(f"{v01:+.4f} [")
    assert "(2 of 3 runs: 1× run and control scored on different test rows)" in joint[PAIRED]


def test_without_predictions_the_seed_rule_alone_decides_and_one_seed_gets_no_call(tmp_path):
    root = tmp_path / "runs"
    for seed, auc in enumerate((0.770, 0.771, 0.772)):
        write(root, f"c{seed}", dense_summary(seed, 0.781))
        write(root, f"m{seed}", compressed_summary("magnitude", seed, auc, {"flops": 0.5}, method="Magnitude"))
    write(root, "j0", compressed_summary("joint", 0, 0.775, {"flops": 0.3}))
    _, rows = table(build_report(root, tmp_path / "out")["report"])
    assert row_of(rows, "magnitude", "flops=0.5")[8] == "-0.0100 ± 0.0010"
    assert row_of(rows, "magnitude", "flops=0.5")[PAIRED].startswith("– (3× no per-row test predictions")
    assert row_of(rows, "joint", "flops=0.3")[8] == "-0.0060 (n=1: no tie call)"


def test_best_per_budget_asks_the_paired_test_between_the_two_methods(tmp_path):
    root = tmp_path / "runs"
    sweep_with_predictions(root, rows=327, run_weight=0.9, seeds=(0, 1))
    sweep_with_predictions(root, rows=327, run_weight=0.8, seeds=(0, 1), mode="magnitude", method="Magnitude")
    result = build_report(root, tmp_path / "out")
    text = result["report"].read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("- **flops=0.5**"))
    rows = {r.mode: r for r in result["rows"]}
    best, nxt = sorted((rows["joint"], rows["magnitude"]), key=lambda r: -r.values("test_auc").mean)
    files = [read_predictions(r.summary["test_predictions"]) for r in (*best.runs, *nxt.runs)]
    cov = delong(files[0].label, *[f.prob for f in files])
    w = np.array([0.5, 0.5, -0.5, -0.5])
    p = math.erfc(abs(w @ cov.auc) / math.sqrt(w @ cov.cov @ w) / math.sqrt(2))
    gap = best.values("test_auc").mean - nxt.values("test_auc").mean
    assert gap > max(best.values("test_auc").std, nxt.values("test_auc").std)  # the seed rule alone: ahead
    assert p >= 0.05
    assert line.endswith(f"— a tie (the gap is beyond the seed std; {p_text(p)} on the test rows (paired DeLong))")
