"""The comparison report (`umec-report`): table numbers from the summaries, the tie rule, the figures, the
refusals, the console script. Summaries are written with the keys `run.py` writes; one test reads the
summaries of real (tiny) runs."""

from __future__ import annotations

import json
import statistics
import sys
from importlib import import_module
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from umec_lightning.errors import USER_ERRORS, ReportError
from umec_lightning.report import build_report, main
from umec_lightning.report.figures import _features_kept

ROOT = Path(__file__).resolve().parents[2]


def dense_summary(seed: int, test_auc: float, mode: str = "dense_control", data: str = "synthetic",
                  model: str = "dlrm_small") -> dict:
    return {"mode": mode, "method": None, "data": {"name": data, "rows": {"train": 100, "val": 10, "test": 10}},
            "model": model, "seed": seed, "dense_flops": 1000, "dense_params": 5000, "val_auc": test_auc,
            "test_auc": test_auc, "test_logloss": 0.45, "steps": 10}


def compressed_summary(mode: str, seed: int, test_auc: float, budget: dict, *, method: str = "UMECMethod",
                       flops_ratio: float = 0.5, params_ratio: float = 0.6, logloss: float = 0.46,
                       dense_test_auc: float = 0.77, budget_met: bool = True, latency=None, data="synthetic",
                       model="dlrm_small", **extra) -> dict:
    return {"mode": mode, "method": method, "data": {"name": data, "rows": {"train": 100, "val": 10, "test": 10}},
            "model": model, "seed": seed, "dense_flops": 1000, "dense_params": 5000,
            "dense_test_auc": dense_test_auc, "dense_test_logloss": 0.47, "test_auc": test_auc,
            "test_logloss": logloss, "delta_test_auc": test_auc - dense_test_auc, "budget": budget,
            "flops": int(flops_ratio * 1000), "params": int(params_ratio * 5000), "flops_ratio": flops_ratio,
            "params_ratio": params_ratio, "budget_met": budget_met,
            "latency_ms": latency or {"dense": {"batch_1": 2.0, "batch_256": 10.0},
                                      "compressed": {"batch_1": 1.0, "batch_256": 4.0}},
            **extra}


def write(root: Path, name: str, summary: dict, config: dict | None = None) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps(summary))
    if config is not None:
        (d / "run_config.json").write_text(json.dumps(config))
    return d


def table(report: Path) -> tuple[list[str], list[list[str]]]:
    lines = [ln for ln in report.read_text().splitlines() if ln.startswith("|")]
    split = [[c.strip() for c in ln.strip("|").split(" | ")] for ln in lines]
    return split[0], split[2:]


def row_of(rows, method_prefix: str, budget: str) -> list[str]:
    found = [r for r in rows if r[0].startswith(method_prefix) and r[1] == budget]
    assert len(found) == 1, (method_prefix, budget, rows)
    return found[0]


JOINT_AUC = [0.780, 0.782, 0.784]      # vs control 0.781: deltas -0.001, +0.001, +0.003 -> mean 0.001, std 0.002
MAGNITUDE_AUC = [0.770, 0.771, 0.772]  # deltas -0.011, -0.010, -0.009 -> mean -0.010, std 0.001: not a tie
CONTROL_AUC = 0.781


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "sweep"
    for seed in range(3):
        write(root, f"control_s{seed}", dense_summary(seed, CONTROL_AUC))
        write(root, f"joint_s{seed}", compressed_summary(
            "joint", seed, JOINT_AUC[seed], {"flops": 0.5}, flops_ratio=0.49 + 0.005 * seed,
            logloss=0.46 + 0.01 * seed, budget_met=seed != 2, quality_collapse=seed == 1,
            latency={"dense": {"batch_1": 2.0, "batch_256": 10.0}, "compressed": {"batch_1": 1.0, "batch_256": 4.0},
                     "ratio": {"batch_1": {"median": 0.6 + 0.1 * seed, "p25": 0.5, "p75": 0.9},
                               "batch_256": {"median": 0.3, "p25": 0.2, "p75": 0.4}}}))
        write(root, f"nested/magnitude_s{seed}", compressed_summary(
            "magnitude", seed, MAGNITUDE_AUC[seed], {"flops": 0.5}, method="Magnitude"))
    write(root, "joint_f03_s0", compressed_summary("joint", 0, 0.775, {"flops": 0.3}, flops_ratio=0.3))
    return root


def test_table_rows_aggregate_over_seeds_with_the_dense_control_reference(sweep, tmp_path):
    out = tmp_path / "out"
    result = build_report(sweep, out)
    assert result["report"] == out / "report.md"
    assert not (sweep / "report.md").exists()  # --out: nothing written into the run dirs
    header, rows = table(out / "report.md")
    assert header[8] == "ΔAUC vs equal-epochs dense (`mode=dense_control` run, same data/model/seed)"
    assert [r[0] for r in rows] == ["dense_control", "joint (UMECMethod)", "joint (UMECMethod)",
                                    "magnitude (Magnitude)"]
    joint = row_of(rows, "joint", "flops=0.5")
    auc = statistics.stdev(JOINT_AUC)
    assert joint[2:4] == ["3", "0,1,2"]
    assert joint[4] == f"{statistics.fmean([0.49, 0.495, 0.5]):.3f} ± {statistics.stdev([0.49, 0.495, 0.5]):.3f}"
    assert joint[6] == f"{statistics.fmean(JOINT_AUC):.4f} ± {auc:.4f}" == "0.7820 ± 0.0020"
    assert joint[7] == "0.4700 ± 0.0100"
    assert joint[8] == "+0.0010 ± 0.0020 (tie)"  # |0.001| < std 0.002
    assert joint[9] == "+0.0200 ± 0.0100"  # Δlogloss against the control's 0.45
    assert joint[10] == "b1: 0.70 ± 0.10 · b256: 0.30 ± 0.00"  # the interleaved ratio block's medians
    assert joint[11] == "2/3 ⚠ 1 collapsed"  # seed 1 met its budget on a collapsed model
    magnitude = row_of(rows, "magnitude", "flops=0.5")
    assert magnitude[8] == "-0.0100 ± 0.0010"  # |-0.010| > std 0.001: no tie
    assert magnitude[9] == "+0.0100 ± 0.0000"
    assert magnitude[10] == "b1: 0.50 ± 0.00 · b256: 0.40 ± 0.00"  # compressed/dense ms without a ratio block
    assert magnitude[11] == "3/3"
    single = row_of(rows, "joint", "flops=0.3")
    assert single[8] == "-0.0060 (n=1: no tie call)"
    assert row_of(rows, "dense_control", "–")[8] == "reference"
    text = (out / "report.md").read_text()
    assert "- **flops=0.5**: joint (UMECMethod), test AUC 0.7820 ± 0.0020 (n=3); next magnitude (Magnitude)" in text
    assert "- **flops=0.3**: joint (UMECMethod), test AUC 0.7750 (n=1) (the only method at this budget)" in text


def test_same_epochs_key_wins_and_the_pretrained_fallback_is_named(tmp_path):
    root = tmp_path / "runs"
    for seed in range(2):
        write(root, f"j{seed}", compressed_summary("joint", seed, 0.78 + 0.01 * seed, {"params": 0.3},
                                                   dense_same_epochs_test_auc=0.775))
        write(root, f"c{seed}", dense_summary(seed, 0.5))  # ignored: the key is present
    header, rows = table(build_report(root)["report"])
    assert header[8] == "ΔAUC vs equal-epochs dense (`dense_same_epochs_test_auc`)"
    assert row_of(rows, "joint", "params=0.3")[8] == "+0.0100 ± 0.0071"  # deltas 0.005, 0.015
    # Neither the key nor a control: the run's own pretrained dense model, said in the header.
    alone = tmp_path / "alone"
    write(alone, "m0", compressed_summary("magnitude", 0, 0.76, {"flops": 0.5}, method="Magnitude"))
    header, rows = table(build_report(alone)["report"])
    assert "pretrained dense model (`dense_test_auc`; no equal-epochs reference found)" in header[8]
    assert rows[0][8] == "-0.0100 (n=1: no tie call)"
    # Both kinds in one table: each cell says which.
    write(alone, "j0", compressed_summary("joint", 0, 0.78, {"flops": 0.5}, dense_same_epochs_test_auc=0.779))
    report = build_report(alone)["report"]
    header, rows = table(report)
    assert header[8] == "ΔAUC vs dense (reference marked per cell)"
    assert row_of(rows, "joint", "flops=0.5")[8] == "+0.0010 (n=1: no tie call)ˢ"
    assert row_of(rows, "magnitude", "flops=0.5")[8] == "-0.0100 (n=1: no tie call)ᵖ"
    assert "ˢ equal-epochs dense (`dense_same_epochs_test_auc`)" in report.read_text()


def test_runs_that_differ_in_config_are_separate_rows(tmp_path):
    root = tmp_path / "runs"
    base = {"mode.name": "joint", "budget.flops": 0.5, "mode.method.admm.group_score": "taylor", "seed": 0}
    for seed in range(2):
        write(root, f"t{seed}", compressed_summary("joint", seed, 0.78, {"flops": 0.5}),
              {**base, "seed": seed, "pretrained": f"/p/{seed}"})
    write(root, "n0", compressed_summary("joint", 0, 0.70, {"flops": 0.5}),
          {**base, "mode.method.admm.group_score": "norm"})
    _, rows = table(build_report(root)["report"])
    labels = sorted((r[0], r[2]) for r in rows)
    assert labels == [("joint (UMECMethod) · group_score=norm", "1"), ("joint (UMECMethod) · group_score=taylor", "2")]


def _history(n_steps: int = 5) -> dict:
    hist = [{"step": 1 + 10 * i, "resource/flops": 1 - 0.1 * i, "kept/features": 27.0 - i,
             "kept/neurons:dense.layers.0": 64.0 - 8 * i, "kept/dims": 16.0 - i, "loss": 0.5,
             "pruned_features": []} for i in range(n_steps)]
    return {"budgets": {"flops": 0.5}, "history": hist}


def test_figures_are_written_and_are_images(sweep, tmp_path):
    for seed in range(3):
        (sweep / f"joint_s{seed}" / "sparsity_history.json").write_text(json.dumps(_history()))
    out = tmp_path / "out"
    figures = build_report(sweep, out)["figures"]
    assert [p.name for p in figures] == ["auc_vs_ratio.png", "kept_groups.png"]  # no cascaded: no Fig. 8
    for p in figures:
        img = mpimg.imread(p)
        assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 300, p
        assert img[..., :3].std() > 0.05  # not a blank canvas
    text = (out / "report.md").read_text()
    assert "![auc_vs_ratio](auc_vs_ratio.png)" in text and "![kept_groups](kept_groups.png)" in text
    write(sweep, "cascaded_s0", compressed_summary("cascaded", 0, 0.779, {"flops": 0.5}))
    names = [p.name for p in build_report(sweep, out)["figures"]]
    assert names == ["auc_vs_ratio.png", "kept_groups.png", "joint_vs_cascaded.png"]
    assert mpimg.imread(out / "joint_vs_cascaded.png").ndim == 3
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_refuses_an_empty_directory(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ReportError, match=r"no summary\.json found below .*empty"):
        build_report(tmp_path / "empty")
    assert main([str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no summary.json found below ") and str(tmp_path / "empty") in err
    assert err.count("\n") == 1  # one line, no traceback


def test_refuses_mixed_datasets_naming_them(tmp_path, capsys):
    for seed in range(3):
        write(tmp_path, f"cs{seed}", dense_summary(seed, 0.7, data="criteo_sample"))
    for seed in range(4):
        write(tmp_path, f"syn{seed}", dense_summary(seed, 0.7, data="synthetic"))
    with pytest.raises(ReportError, match=r"data: criteo_sample \(3 runs\), synthetic \(4 runs\)"):
        build_report(tmp_path)
    assert main([str(tmp_path)]) == 2
    assert "data: criteo_sample (3 runs), synthetic (4 runs)" in capsys.readouterr().err
    assert not (tmp_path / "report.md").exists()
    # --data selects one of them
    assert main([str(tmp_path), "--data", "synthetic", "--out", str(tmp_path / "o")]) == 0
    assert table(tmp_path / "o" / "report.md")[1][0][2] == "4"


def test_refuses_mixed_models_naming_them(tmp_path):
    write(tmp_path, "a", dense_summary(0, 0.7, model="dlrm_small"))
    write(tmp_path, "b", dense_summary(0, 0.7, model="dlrm_kaggle"))
    with pytest.raises(ReportError, match=r"model: dlrm_kaggle \(1 run\), dlrm_small \(1 run\)"):
        build_report(tmp_path)


def test_refuses_an_unreadable_summary_naming_the_file(tmp_path, capsys):
    write(tmp_path, "good", dense_summary(0, 0.7))
    bad = tmp_path / "bad" / "summary.json"
    bad.parent.mkdir()
    bad.write_text('{"mode": "joint", "seed": ')
    with pytest.raises(ReportError, match=rf"cannot read {bad}"):
        build_report(tmp_path)
    assert main([str(tmp_path)]) == 2
    assert f"cannot read {bad}" in capsys.readouterr().err
    bad.write_text(json.dumps({"mode": "joint"}))  # valid JSON, not a summary
    with pytest.raises(ReportError, match=rf"cannot read {bad}: not a run summary, missing key\(s\) data"):
        build_report(tmp_path)
    assert ReportError in USER_ERRORS  # train.py and the CLI report it in one line


def test_console_script_is_declared():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    target = project["scripts"]["umec-report"]
    assert target == "umec_lightning.report:main"
    module, func = target.split(":")
    assert getattr(import_module(module), func) is main


@pytest.mark.slow  # ~10 s in a subprocess; the report's function is what the tests above run
def test_module_runs_as_a_script(tmp_path):
    import subprocess

    write(tmp_path, "c0", dense_summary(0, 0.7))
    write(tmp_path, "j0", compressed_summary("joint", 0, 0.72, {"flops": 0.5}))
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "umec_lightning.report", str(tmp_path), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "o" / "report.md").exists() and "report.md" in done.stdout
    done = subprocess.run([sys.executable, "-m", "umec_lightning.report", str(tmp_path / "nothing")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith("error: ")


def test_report_on_real_tiny_runs(tmp_path):
    """Summaries written by `run.run` (what train.py calls): a joint run and its dense_control, one seed."""
    from tests.pipeline.conftest import compose_cfg
    from umec_lightning.run import run

    common = ["phases.pretrain_epochs=1", "phases.compress_epochs=1", "phases.finetune_epochs=1",
              "loader.limit_rows={train:3000,val:1000,test:1000}", "latency.batches=[1,64]"]
    runs = tmp_path / "runs"
    joint = run(compose_cfg(["mode=joint", "budget.flops=0.5", *common], tmp_path / "cache"), runs / "joint")
    control = run(compose_cfg(["mode=dense_control", *common], tmp_path / "cache"), runs / "control")
    out = tmp_path / "out"
    result = build_report(runs, out)
    header, rows = table(out / "report.md")
    assert "dense_control" in header[8]
    row = row_of(rows, "joint (UMECMethod)", "flops=0.5")
    assert row[6] == f"{joint['test_auc']:.4f}"
    # One seed: the tie call is the paired DeLong test on the test rows of the two runs' per-row predictions.
    from umec_lightning.predictions import read_predictions
    from umec_lightning.report.delong import paired_test

    mine, theirs = read_predictions(joint["test_predictions"]), read_predictions(control["test_predictions"])
    assert mine.rows_key == theirs.rows_key and len(mine.label) == 1000
    test = paired_test(mine.label, mine.prob, theirs.prob)
    assert test.value == pytest.approx(joint["test_auc"] - control["test_auc"], abs=1e-3)  # exact vs binned AUROC
    p = "p<0.001" if test.p < 0.001 else f"p={test.p:.3f}"
    assert row[8] == f"{joint['test_auc'] - control['test_auc']:+.4f}" + (" (tie)" if test.p >= 0.05 else "")
    assert row[13] == f"{test.value:+.4f} [{test.low:+.4f}, {test.high:+.4f}] {p}"
    assert row[4] == f"{joint['flops_ratio']:.3f}" and row[11].startswith("1/1" if joint["budget_met"] else "0/1")
    lat = joint["latency_ms"]["ratio"]
    assert row[10] == f"b1: {lat['batch_1']['median']:.2f} · b64: {lat['batch_64']['median']:.2f}"
    assert [p.name for p in result["figures"]] == ["auc_vs_ratio.png", "kept_groups.png"]
    for p in result["figures"]:
        assert mpimg.imread(p).ndim == 3


def test_wandb_offline_run_holds_the_table_and_the_figures(sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("UMEC_REPORT_WANDB", "1")  # the same as --wandb
    out = tmp_path / "out"
    assert main([str(sweep), "--out", str(out)]) == 0
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    tables = list(runs[0].glob("files/media/table/comparison_*.table.json"))
    assert len(tables) == 1
    logged = json.loads(tables[0].read_text())
    _, rows = table(out / "report.md")
    assert logged["columns"][0] == "method" and logged["data"] == rows
    images = sorted(p.name.split("_0_")[0] for p in runs[0].glob("files/media/images/figures/*.png"))
    assert images == ["auc_vs_ratio"]


def test_feature_selection_gets_the_features_kept_figure(tmp_path):
    root = tmp_path / "runs"
    names = [f"C{i}" for i in range(1, 27)]
    for seed in range(2):
        for budget, kept in ((0.95, 24), (0.9, 22)):
            write(root, f"is{budget}_{seed}", compressed_summary(
                "input_selection", seed, 0.78, {"flops": budget}, kept={"features": ["dense", *names[:kept]]}),
                {"mode.name": "input_selection", "budget.flops": budget, "seed": seed})
        for lam, kept in ((0.001, 21), (0.01, 12)):
            write(root, f"gl{lam}_{seed}", compressed_summary(
                "group_lasso", seed, 0.77, {}, method="GroupLasso", kept={"features": names[:kept]}),
                {"mode.name": "group_lasso", "mode.method.lam": lam, "seed": seed})
    result = build_report(root, tmp_path / "out")
    assert "auc_vs_features.png" in [p.name for p in result["figures"]]
    img = mpimg.imread(tmp_path / "out" / "auc_vs_features.png")
    assert img.ndim == 3 and img[..., :3].std() > 0.05
    assert _features_kept(result["rows"][0].runs[0]) in (12, 21, 22, 24)  # "dense" is not a feature
