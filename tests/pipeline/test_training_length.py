"""Training length that fits the data (early stopping on validation AUC) and the optimizer option, through
the real config and pipeline.

Plateaus are made deterministic with a tiny learning rate: the validation AUC then moves by ~1e-5 per
check, far below `min_delta`, so every check after the first is "no improvement"."""

import csv
import json
import math
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir

from umec_lightning.config import ConfigError
from umec_lightning.run import run

from .conftest import ROOT, compose_cfg

TINY_ROWS = "loader.limit_rows={train:3000,val:1000,test:1000}"  # 24 steps per epoch at batch 128
STEPS_PER_EPOCH = 24
PLATEAU = [TINY_ROWS, "optim.lr=1e-6", "phases.early_stopping.min_delta=0.05"]


def logged(run_dir, key: str) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(row[key]) for row in csv.DictReader(f) if row.get(key)]


def test_early_stopping_ends_a_plateaued_pretrain_before_its_max_epochs_on_its_best_weights(tmp_path, cache_dir):
    cfg = compose_cfg([*PLATEAU, "phases.pretrain_epochs=5", "phases.early_stopping.patience=1"], cache_dir)
    summary = run(cfg, tmp_path)
    # Check 1 (mid epoch 0) is the best, check 2 (end of epoch 0) does not improve: patience 1 is spent.
    assert summary["stopped_early"] is True
    assert summary["epochs_run"] == 1 < 5
    assert summary["steps"] == STEPS_PER_EPOCH
    assert json.loads((tmp_path / "phases" / "pretrain.json").read_text())["stopped_early"] is True
    # What the stage hands on is the best-on-validation checkpoint, not the last weights.
    aucs = logged(tmp_path, "pretrain/val/auc")
    assert summary["val_auc"] == pytest.approx(max(aucs[:2]), abs=1e-6)


def test_fixed_epochs_stay_the_default_and_are_recorded(tmp_path, cache_dir):
    summary = run(compose_cfg([*PLATEAU, "phases.pretrain_epochs=2"], cache_dir), tmp_path)
    assert summary["stopped_early"] is False
    assert summary["epochs_run"] == 2 and summary["steps"] == 2 * STEPS_PER_EPOCH


def test_early_stopping_state_survives_an_interruption_and_a_finished_stop_stays_finished(tmp_path, cache_dir):
    overrides = [*PLATEAU, "phases.pretrain_epochs=5", "phases.early_stopping.patience=2"]
    whole = run(compose_cfg(overrides, cache_dir), tmp_path / "whole")
    # Best at check 1, no improvement at checks 2 and 3: it stops in the middle of epoch 1.
    assert whole["stopped_early"] is True
    assert (whole["epochs_run"], whole["steps"]) == (2, STEPS_PER_EPOCH + STEPS_PER_EPOCH // 2)

    # Interrupted at the start of epoch 1: the resumed fit must remember check 1's best and check 2's wait
    # (a fresh EarlyStopping would call check 3 an improvement and train on to check 5).
    resumed_dir = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="simulated interruption"):
        run(compose_cfg([*overrides, "debug.interrupt={phase:pretrain,epoch:1}"], cache_dir), resumed_dir)
    resumed = run(compose_cfg([*overrides, "resume=true"], cache_dir), resumed_dir)
    for key in ("stopped_early", "epochs_run", "steps"):
        assert resumed[key] == whole[key], key
    assert resumed["test_auc"] == pytest.approx(whole["test_auc"], abs=1e-6)

    # Killed after the stop but before the stage's marker: resumed from the epoch-end checkpoint written
    # after the stop, the stage ends there (no further training) and records the same.
    (resumed_dir / "phases" / "pretrain.json").unlink()
    (resumed_dir / "summary.json").unlink()
    again = run(compose_cfg([*overrides, "resume=true"], cache_dir), resumed_dir)
    for key in ("stopped_early", "epochs_run", "steps"):
        assert again[key] == whole[key], key
    assert again["test_auc"] == pytest.approx(whole["test_auc"], abs=1e-6)


def test_finetune_stops_early_and_compress_runs_its_schedule(tmp_path, cache_dir):
    cfg = compose_cfg([*PLATEAU, "mode=joint", "budget.flops=0.5", "phases.compress_epochs=2",
                       "phases.finetune_epochs=4", "phases.early_stopping.patience=1"], cache_dir)
    summary = run(cfg, tmp_path)
    compress, finetune = summary["stages"]["compress"], summary["stages"]["finetune"]
    assert compress["epochs_run"] == 2 and "stopped_early" not in compress
    assert compress["admm_steps"] == 2 * STEPS_PER_EPOCH - round(0.05 * 2 * STEPS_PER_EPOCH)  # joint's warm-up
    assert finetune["stopped_early"] is True and finetune["epochs_run"] == 1 < 4
    assert summary["pretrain"]["epochs_run"] == 1
    aucs = logged(tmp_path, "finetune/val/auc")
    assert summary["val_auc"] == pytest.approx(max(aucs), abs=1e-6)
    assert summary["budget_met"] is True


# ---- the optimizer option -------------------------------------------------------------------------------

# (group choice, lr that learns in one small epoch, the state the optimizer keeps per parameter)
OPTIMIZERS = [("sgd", 1.0, None), ("adam", 0.01, "exp_avg"), ("adagrad", 0.1, "sum")]


@pytest.mark.parametrize("name, lr, state_key", OPTIMIZERS)
def test_each_optimizer_trains_a_dense_model_and_a_joint_compression(tmp_path, cache_dir, name, lr, state_key):
    dense = run(compose_cfg([f"optim={name}", f"optim.lr={lr}"], cache_dir), tmp_path / "dense")
    assert dense["test_auc"] > 0.6, dense["test_auc"]  # SMALL data, 125 steps: it learns (as test_dense)
    ckpt = torch.load(tmp_path / "dense" / "checkpoints" / "pretrain" / "epoch-end.ckpt", weights_only=False)
    state = ckpt["optimizer_states"][0]["state"]
    if name == "sgd":
        assert ckpt["optimizer_states"][0]["param_groups"][0]["momentum"] == 0 and not state  # plain: no state
    else:
        assert state_key in state[0]
    joint = run(compose_cfg([f"optim={name}", f"optim.lr={lr}", "mode=joint", "budget.flops=0.5",
                             "phases.finetune_epochs=1", TINY_ROWS], cache_dir), tmp_path / "joint")
    assert joint["budget_met"] is True and joint["flops_ratio"] <= 0.5
    assert joint["stages"]["compress"]["admm_steps"] == STEPS_PER_EPOCH - 1  # 5 % warm-up: 1 step
    assert math.isfinite(joint["test_auc"]) and joint["stages"]["finetune"]["epochs_run"] == 1


@pytest.mark.parametrize("override, message", [
    ("optim._target_=torch.optim.Nadamx", "config key `optim._target_`"),
    ("+optim.foo=1", r"config key `optim` \(torch.optim.SGD\): .*foo"),
    ("optim=adam +optim.betas=[0.9,1.5]", r"config key `optim` \(torch.optim.Adam\): .*beta"),
    ("optim._target_=torch.optim.SparseAdam", "config key `optim._target_`: SparseAdam"),
    ("optim._target_=collections.OrderedDict", "config key `optim._target_`: collections.OrderedDict is not"),
    ("phases.early_stopping.patience=0", "config key `phases.early_stopping.patience`"),
    ("phases.early_stopping.patience=2 phases.early_stopping.min_delta=-1",
     "config key `phases.early_stopping.min_delta`"),
])
def test_bad_optimizer_or_early_stopping_config_names_the_key_before_work(tmp_path, cache_dir, override, message):
    cfg = compose_cfg([TINY_ROWS, *override.split()], cache_dir)
    with pytest.raises(ConfigError, match=message):
        run(cfg, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("override, message", [
    ("optim=nadam", "optim"),  # not in the group: Hydra lists the choices
    ("+optim.foo=1", "config key `optim`"),
])
def test_bad_optimizer_is_a_one_line_error_from_train_py(tmp_path, override, message):
    cmd = [sys.executable, "train.py", override, "logger=csv", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_the_default_optimizer_is_the_papers_plain_sgd(cache_dir):
    cfg = compose_cfg([], cache_dir)
    assert cfg.optim._target_ == "torch.optim.SGD" and cfg.optim.momentum == 0 and cfg.optim.weight_decay == 0
    assert cfg.phases.early_stopping.patience is None
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        assert compose("config").optim.lr == 0.1
