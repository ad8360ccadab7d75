"""The shared dense reference (`reference.dir`): one dense run per key hands every compression run its
pretrain point and the equal-epochs control; a multirun trains it once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from umec_lightning.reference import DenseReference
from umec_lightning.run import run

from .conftest import ROOT, SMALL, compose_cfg, read_summary

ROWS = "loader.limit_rows={train:4000,val:1000,test:1000}"
PHASES = ["phases.pretrain_epochs=1", "phases.compress_epochs=1", "phases.finetune_epochs=1"]


def test_the_reference_is_the_pretrain_point_and_the_equal_epochs_control(tmp_path, cache_dir):
    ref = tmp_path / "dense"
    common = [ROWS, *PHASES, "mode=magnitude", f"reference.dir={ref}"]
    first = run(compose_cfg([*common, "budget.flops=0.5"], cache_dir), tmp_path / "first")
    keys = sorted(p.name for p in ref.iterdir() if p.is_dir())
    assert len(keys) == 1
    record = json.loads((ref / keys[0] / "reference.json").read_text())
    stamp = (ref / keys[0] / "reference.json").stat().st_mtime_ns
    second = run(compose_cfg([*common, "budget.flops=0.3"], cache_dir), tmp_path / "second")
    # The second run read the reference: nothing retrained, one key, the same starting checkpoint.
    assert (ref / keys[0] / "reference.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in ref.iterdir() if p.is_dir()) == keys
    for summary in (first, second):
        assert summary["pretrain"]["pretrained"] == record["pretrain_checkpoint"]
        assert summary["pretrain"]["dense_reference"] == keys[0]
        assert summary["dense_same_epochs"] == 2  # magnitude: 1 pretrain + 0 (one-shot) + 1 finetune epochs
        assert summary["dense_same_epochs_test_auc"] == record["same_epochs"]["2"]["test_auc"]
        assert summary["delta_test_auc_same_epochs"] == pytest.approx(
            summary["test_auc"] - summary["dense_same_epochs_test_auc"], abs=1e-12)
    assert first["dense_test_auc"] == second["dense_test_auc"]

    # The pretrain point is what a run's own pretrain stage hands on, the control what mode=dense_control
    # trains: the same seed, init and data order give the same figures.
    alone = run(compose_cfg([ROWS, *PHASES, "mode=magnitude", "budget.flops=0.5"], cache_dir), tmp_path / "alone")
    assert alone["dense_test_auc"] == pytest.approx(first["dense_test_auc"], abs=1e-6)
    assert alone["test_auc"] == pytest.approx(first["test_auc"], abs=1e-6)
    assert "dense_same_epochs_test_auc" not in alone  # reference.dir null: no control, none claimed
    control = run(compose_cfg([ROWS, *PHASES, "phases.compress_epochs=0", "mode=dense_control"], cache_dir),
                  tmp_path / "control")
    assert control["test_auc"] == pytest.approx(record["same_epochs"]["2"]["test_auc"], abs=1e-6)

    # A longer run (cascaded: one more compress stage, 4 epochs in all) continues the same dense run: the
    # pretrain point stays, a 4-epoch control is added, equal to mode=dense_control with 4 epochs.
    longer = run(compose_cfg([*common, "mode=cascaded", "budget.flops=0.5"], cache_dir), tmp_path / "longer")
    record = json.loads((ref / keys[0] / "reference.json").read_text())
    assert sorted(record["same_epochs"]) == ["2", "4"] and record["epochs_trained"] == 4
    assert longer["dense_same_epochs"] == 4 and longer["dense_test_auc"] == first["dense_test_auc"]
    control4 = run(compose_cfg([ROWS, *PHASES, "phases.finetune_epochs=2", "mode=dense_control"], cache_dir),
                   tmp_path / "control4")
    assert control4["test_auc"] == pytest.approx(record["same_epochs"]["4"]["test_auc"], abs=1e-6)

    # A shorter total that no run recorded (3 < the 4 trained): its own 3-epoch dense run, from the same weights.
    shorter = run(compose_cfg([*common, "phases.finetune_epochs=2", "budget.flops=0.5"], cache_dir),
                  tmp_path / "shorter")
    record = json.loads((ref / keys[0] / "reference.json").read_text())
    assert (ref / keys[0] / "control-3" / "phases" / "dense.json").exists() and record["epochs_trained"] == 4
    three = run(compose_cfg([ROWS, *PHASES, "mode=dense_control"], cache_dir), tmp_path / "control3")
    assert shorter["dense_same_epochs_test_auc"] == pytest.approx(three["test_auc"], abs=1e-6)
    assert shorter["dense_test_auc"] == first["dense_test_auc"]


def test_the_key_follows_what_changes_the_dense_run(tmp_path, cache_dir):
    def key(*overrides):
        cfg = compose_cfg([ROWS, *PHASES, "mode=joint", "budget.flops=0.5", *overrides], cache_dir)
        return DenseReference(tmp_path, cfg, "fingerprint", {"structure": 1}, 3).key

    base = key()
    assert key("budget.flops=0.3") == base and key("mode=magnitude") == base  # what compression does: no
    assert key("logger=default", "log_every_n_steps=7") == base
    assert key("phases.finetune_epochs=2") == base  # the total: one run, a control per total
    for changed in ("seed=1", "optim.lr=0.5", "phases.pretrain_epochs=2",
                    "loader.batch_size=64", "model.embedding_dim=8", "trainer.precision=bf16-mixed"):
        assert key(changed) != base, changed


def test_one_list_of_result_neutral_keys_decides_the_resume_check_and_the_reference_key(tmp_path, cache_dir):
    """Each key of config.RESULT_NEUTRAL_KEYS (every scalar under them in the composed config), changed, changes
    neither what a resume must match nor the reference key; a result-affecting key under the same groups does."""
    from omegaconf import OmegaConf

    from umec_lightning.config import RESULT_NEUTRAL_KEYS, flat_config, result_neutral
    from umec_lightning.reference import reference_material
    from umec_lightning.run import result_config

    cfg = compose_cfg([ROWS, *PHASES, "mode=joint", "budget.flops=0.5"], cache_dir)
    OmegaConf.resolve(cfg)

    def seen(c):
        return result_config(c), reference_material(c, "fingerprint", {"structure": 1})

    base, changed = seen(cfg), []
    for key, value in flat_config(cfg).items():
        if not result_neutral(key) or not isinstance(value, (bool, int, float, str)):
            continue
        other = cfg.copy()
        OmegaConf.update(other, key, (not value) if isinstance(value, bool) else value + type(value)(1))
        assert seen(other) == base, key
        changed.append(key)
    assert {k.split(".")[0] for k in changed} >= {"resume", "trainer", "loader", "latency", "export", "eval"}
    flat = flat_config(cfg)
    for neutral in RESULT_NEUTRAL_KEYS:  # the list names keys the config has, not stale ones
        assert any(k == neutral or k.startswith(f"{neutral}.") for k in flat), neutral
    for key, value in (("eval.auroc_bins", 1024), ("loader.batch_size", 64)):  # beside neutral keys, not neutral
        other = cfg.copy()
        OmegaConf.update(other, key, value)
        ours, theirs = seen(other)
        assert ours != base[0] and theirs != base[1], key


@pytest.mark.slow  # ~10 s: a real multirun; the reference itself is checked by the test above
def test_a_multirun_trains_one_reference_for_its_members(tmp_path, cache_dir):
    sweep_dir, ref = tmp_path / "sweep", tmp_path / "dense"
    cmd = [sys.executable, "train.py", "-m", *SMALL, f"loader.cache_root={cache_dir}", ROWS, *PHASES,
           "mode=magnitude", "budget.flops=0.5,0.3", f"reference.dir={ref}", f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    members = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    summaries = [read_summary(m) for m in members]
    assert len(summaries) == 2
    assert len({s["pretrain"]["pretrained"] for s in summaries}) == 1  # one shared checkpoint
    assert len([p for p in ref.iterdir() if p.is_dir()]) == 1
    assert all(s["dense_same_epochs_test_auc"] == summaries[0]["dense_same_epochs_test_auc"] for s in summaries)
    assert (proc.stdout + proc.stderr).count("training it in") == 1
    # The report over the sweep: a row per member, ΔAUC against the equal-epochs control, its figure.
    import matplotlib.image as mpimg

    from umec_lightning.report import build_report

    report = build_report(sweep_dir)
    assert [(r.mode, r.budget_text) for r in report["rows"]] == [("magnitude", "flops=0.3"), ("magnitude", "flops=0.5")]
    text = report["report"].read_text()
    assert "equal-epochs dense (`dense_same_epochs_test_auc`)" in text
    for summary in summaries:
        assert f"{summary['test_auc'] - summary['dense_same_epochs_test_auc']:+.4f}" in text
    assert [p.name for p in report["figures"]][0] == "auc_vs_ratio.png"
    assert mpimg.imread(report["figures"][0]).ndim == 3
