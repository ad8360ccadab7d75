import json
import os
import subprocess
import sys

import pytest

from umec_lightning.run import run

from .conftest import ROOT, SMALL, compose_cfg, read_summary

DENSE_KEYS = {"mode", "data", "model", "dense_flops", "dense_params", "val_auc", "val_accuracy", "val_logloss",
              "test_auc", "test_accuracy", "test_logloss", "oracle_auc", "train_seconds", "samples_per_second"}


def test_dense_run_through_the_real_config_writes_a_complete_summary(tmp_path, cache_dir):
    cfg = compose_cfg([], cache_dir)
    summary = run(cfg, tmp_path)
    assert DENSE_KEYS <= set(summary)
    assert read_summary(tmp_path) == json.loads(json.dumps(summary))
    assert summary["mode"] == "dense" and summary["model"] == "dlrm_small"
    assert summary["data"]["rows"] == {"train": 16000, "val": 4000, "test": 4000}
    assert 0.5 < summary["oracle_auc"] < 1
    # It learns: clearly above chance, and not above what the planted truth allows.
    assert 0.6 < summary["test_auc"] <= summary["oracle_auc"] + 0.01
    assert summary["samples_per_second"] > 0
    assert (tmp_path / "checkpoints" / "pretrain" / "best.ckpt").exists()
    assert (tmp_path / "csv" / "metrics.csv").exists()


def test_train_py_with_wandb_offline_and_a_real_criteo_sample(tmp_path, cache_dir):
    """The entry point as users run it, on the real 10k-line Criteo sample, W&B in offline mode."""
    env = {**os.environ, "WANDB_MODE": "offline", "UMEC_CACHE": str(cache_dir)}
    overrides = [o for o in SMALL if not o.startswith(("data.", "logger"))]
    cmd = [sys.executable, "train.py", "data=criteo_sample", "logger=default", *overrides,
           f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(tmp_path)
    rows = summary["data"]["rows"]
    assert rows == {"train": 8572, "val": 714, "test": 714}  # 7-day rule: 4 x 1429 + 3 x 1428
    assert "oracle_auc" not in summary
    assert 0.0 < summary["test_auc"] <= 1.0
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, "no offline W&B run was written"


# Through train.py: Hydra's own errors (an unknown group option) and our ConfigError, each one line. The
# other config checks raise the same ConfigError, tested in-process below (a train.py start is ~6 s).
@pytest.mark.parametrize("override, message", [
    ("mode=squeeze", "mode"),
    ("model=dlrm_huge", "model"),
    ("mode=joint", "needs a budget"),
    ("data.path=/nonexistent/train.txt data=criteo_sample", "/nonexistent/train.txt"),
])
def test_bad_config_is_a_one_line_error_before_work(tmp_path, override, message):
    parts = override.split()
    if parts[0].startswith("data.path"):
        parts = parts[::-1]
    cmd = [sys.executable, "train.py", *parts, "logger=csv", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("overrides, key", [
    (["loader.batch_size=-5"], "loader.batch_size"),
    (["nan_check_every=0"], "nan_check_every"),
    (["mode=joint", "budget.flops=1.5"], "budget.flops"),
])
def test_bad_config_key_is_refused_before_work(tmp_path, cache_dir, overrides, key):
    from umec_lightning.config import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run(compose_cfg(overrides, cache_dir), tmp_path)
    assert not (tmp_path / "checkpoints").exists()
