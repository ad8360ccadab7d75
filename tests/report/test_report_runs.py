"""The report over real (tiny) runs: controls under early stopping say what they trained, every evaluated model
leaves its per-row test predictions, and members that failed (their failed.json, written by the sweep's own
`run_member`) are listed with their reason and overrides."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from tests.pipeline.conftest import CONF, compose_cfg
from umec_lightning import sweep
from umec_lightning.errors import USER_ERRORS, ReportError
from umec_lightning.predictions import read_predictions
from umec_lightning.report import build_report, main
from umec_lightning.report.delong import auc_interval
from umec_lightning.run import run

from .test_report import dense_summary, row_of, table, write

TINY = "loader.limit_rows={train:3000,val:1000,test:1000}"
# A learning rate of 1e-6 moves validation AUC by ~1e-5 per check, far below min_delta: with patience 1 every
# stage that can stop ends after its first epoch (tests/pipeline/test_training_length.py).
PLATEAU = [TINY, "optim.lr=1e-6", "phases.early_stopping.min_delta=0.05", "phases.early_stopping.patience=1",
           "latency.batches=[1]", "latency.repeats=1"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def test_controls_under_early_stopping_say_what_they_trained(tmp_path, cache):
    ref = tmp_path / "dense"
    common = [*PLATEAU, "mode=magnitude", "phases.pretrain_epochs=2", f"reference.dir={ref}"]
    runs = tmp_path / "runs"
    four = run(compose_cfg([*common, "budget.flops=0.5", "phases.finetune_epochs=2"], cache), runs / "four")
    five = run(compose_cfg([*common, "budget.flops=0.3", "phases.finetune_epochs=3"], cache), runs / "five")
    (key,) = [p for p in ref.iterdir() if p.is_dir()]
    record = json.loads((key / "reference.json").read_text())
    # The dense run stopped after 1 of at most 4 epochs; the 5-epoch control is that model, recorded, not retrained.
    assert record["same_epochs"]["4"]["epochs_run"] == 1 and record["same_epochs"]["4"]["stopped_early"] is True
    assert record["same_epochs"]["5"]["same_model_as"] == "4" and not (key / "control-5").exists()
    assert four["dense_same_epochs"] == 4 and five["dense_same_epochs"] == 5
    for summary in (four, five):
        assert summary["dense_same_epochs_run"] == 1 and summary["dense_same_epochs_stopped_early"] is True
        assert summary["dense_same_epochs_early_stopping"] == {"patience": 1, "min_delta": 0.05}
        assert summary["dense_same_epochs_test_auc"] == four["dense_same_epochs_test_auc"]
    assert five["dense_same_epochs_same_model_as"] == "4"
    # Every evaluated model left its per-row predictions, on the same rows, with the AUC the summary reports.
    control = read_predictions(four["dense_same_epochs_test_predictions"])
    assert control.path == key / "test_predictions_4ep.npz"
    for summary in (four, five):
        for name in ("test", "dense_test", "dense_same_epochs_test"):
            preds = read_predictions(summary[f"{name}_predictions"])
            assert preds.rows_key == control.rows_key and len(preds.label) == 1000
            assert auc_interval(preds.label, preds.prob).value == pytest.approx(summary[f"{name}_auc"], abs=1e-3)
    # The test split does not depend on `seed` (the data's own settings make it): another seed, the same rows.
    other = run(compose_cfg([*PLATEAU, "mode=dense_control", "seed=1"], cache), tmp_path / "seed1")
    assert read_predictions(other["test_predictions"]).rows_key == control.rows_key
    # eval.test_predictions=false: no file, no key (a large test split's choice).
    none = run(compose_cfg([*PLATEAU, "mode=dense_control", "seed=1", "eval.test_predictions=false"], cache),
               tmp_path / "none")
    assert "test_predictions" not in none and not list((tmp_path / "none").glob("test_predictions*"))

    report = build_report(runs, tmp_path / "out")
    header, rows = table(report["report"])
    assert header[8] == ("ΔAUC vs dense under the same early stopping, at most as many epochs "
                         "(`dense_same_epochs_test_auc`)")
    # Each run: 1 epoch of the shared dense run (its pretrain point; it stopped there), 0 compress, finetune
    # stopped after 1; the controls: 1 epoch of at most 4 (5), stopped early.
    assert row_of(rows, "magnitude", "flops=0.5")[-1] == "2 · 1 of ≤4, stopped early (1/1)"
    assert row_of(rows, "magnitude", "flops=0.3")[-1] == "2 · 1 of ≤5, stopped early (1/1)"
    assert five["stages"]["finetune"]["epochs_run"] == 1
    assert "they are not equal-epochs models" in report["report"].read_text()


def _member(tmp_path, name: str, overrides: list[str], cache):
    """A multirun member's config, as Hydra gives it to train.py: its dir, job number and overrides."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"loader.cache_root={cache}"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / name)
        cfg.hydra.job.num = int(name.split("-")[0])
    (tmp_path / name).mkdir(parents=True, exist_ok=True)
    return cfg


def test_failed_members_are_listed_with_their_reason_and_overrides(tmp_path, cache, monkeypatch):
    root = tmp_path / "sweep"
    monkeypatch.setattr(sweep, "_swept_keys", {"seed", "loader.batch_size"})
    for seed in range(2):
        write(root, f"{seed}-seed={seed}", dense_summary(seed, 0.7))
    # Two members that fail through the sweep's own wrapper around the real run: bad input, before any work.
    bad_batch = _member(root, "2-loader.batch_size=-5,seed=0", ["loader.batch_size=-5", "seed=0"], cache)
    no_budget = _member(root, "3-seed=1", ["mode=joint", "seed=1"], cache)
    # A stale summary of an earlier sweep into that dir (run_member replaces failed.json, not summary.json).
    (root / "3-seed=1" / "summary.json").write_text(json.dumps(dense_summary(1, 0.99)))
    for cfg in (bad_batch, no_budget):
        assert np.isnan(sweep.run_member(run, cfg, cfg.hydra, USER_ERRORS))
    result = build_report(root, tmp_path / "out")
    assert [len(r.runs) for r in result["rows"]] == [2]  # the stale summary is not in the table
    text = result["report"].read_text()
    assert "**2 member(s) failed** and are not in the table" in text
    failed = text[text.index("## Failed members (2)"):].splitlines()
    first = json.loads((root / "2-loader.batch_size=-5,seed=0" / "failed.json").read_text())
    assert failed[3] == (f"- `2-loader.batch_size=-5,seed=0` (job 2, overrides: `loader.batch_size=-5 seed=0 "
                         f"loader.cache_root={cache}`): bad input: {first['error']}")
    assert failed[4].startswith("- `3-seed=1` (job 3, overrides: `mode=joint seed=1 ")
    assert "bad input: ConfigError: mode=joint needs a budget" in failed[4]
    assert failed[4].endswith("; its summary.json (an earlier run's) is left out")
    # Only failures below the directory: refused in one line that names them.
    only = tmp_path / "only"
    only.mkdir()
    (root / "2-loader.batch_size=-5,seed=0").rename(only / "2-bad")
    with pytest.raises(ReportError, match=r"no summary\.json found below .*; 1 member\(s\) failed \(failed\.json\): "
                                          r"2-bad: ConfigError: .*loader\.batch_size"):
        build_report(only)
    assert main([str(only)]) == 2
