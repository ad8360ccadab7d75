"""Hydra multiruns: short member directories, a failed member that does not stop the sweep, the value a
sweeper optimises (validation AUC, never test AUC)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

from umec_lightning import sweep
from umec_lightning.errors import USER_ERRORS

from .conftest import CONF, ROOT, SMALL, read_summary

TINY_ROWS = "loader.limit_rows={train:2000,val:1000,test:1000}"


@pytest.mark.slow  # ~14 s; a multirun under the basic launcher stays in CI (tests/pipeline/test_sweep_budgets.py)
def test_a_multirun_goes_on_past_a_bad_member_and_names_member_dirs_by_the_swept_keys(tmp_path):
    # A long (non-swept) path: with the old `${hydra.job.num}-${hydra.job.override_dirname}` subdir the
    # member directory name ran past the 255-byte limit (Errno 36) before any member started.
    cache_root = tmp_path.joinpath(*[f"a_rather_long_directory_name_{i:02d}" for i in range(10)], "cache")
    assert len(str(cache_root)) > 255
    sweep_dir = tmp_path / "sweep"
    small = [o for o in SMALL if not o.startswith("loader.batch_size=")]
    cmd = [sys.executable, "train.py", "-m", *small, f"loader.cache_root={cache_root}", TINY_ROWS,
           "seed=0,1", "loader.batch_size=-5,128", f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = proc.stdout + proc.stderr

    members = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    # Every member ran (the last one after two failures), each named by its number and swept keys only.
    assert members == ["0-loader.batch_size=-5,seed=0", "1-loader.batch_size=128,seed=0",
                       "2-loader.batch_size=-5,seed=1", "3-loader.batch_size=128,seed=1"], out[-3000:]
    for name in members:
        member = sweep_dir / name
        if "batch_size=-5" in name:
            failed = json.loads((member / "failed.json").read_text())
            assert failed["user_error"] is True
            assert "loader.batch_size" in failed["error"] and "-5" in failed["error"]
            assert "loader.batch_size=-5" in failed["overrides"]
            assert failed["swept"] == [f"seed={name[-1]}", "loader.batch_size=-5"]
            assert not (member / "summary.json").exists()
        else:
            assert not (member / "failed.json").exists(), (member / "failed.json").read_text()
            summary = read_summary(member)
            assert 0.0 < summary["val_auc"] <= 1.0
    # The failure is reported in the log, naming the member and the error; the exit status says so too.
    assert "sweep member #0 (seed=0 loader.batch_size=-5) failed: ConfigError" in out
    assert proc.returncode == 1, out[-3000:]
    assert "error: 2 sweep member(s) failed" in proc.stderr
    assert "Traceback" not in out  # bad input in a member: one line, not a traceback

    # The same sweep again into the same dir, without resume: the finished members' dirs are refused (they hold an
    # earlier run's outputs), nothing is written into them, and the exit status says so.
    before = {name: (sweep_dir / name / "summary.json").read_bytes() for name in members if "128" in name}
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = again.stdout + again.stderr
    assert again.returncode == 1, out[-3000:]
    for name, summary in before.items():
        assert (sweep_dir / name / "summary.json").read_bytes() == summary
        assert not (sweep_dir / name / "failed.json").exists()
    assert "sweep member #1 (seed=0 loader.batch_size=128) refused" in out
    assert "error: 4 sweep member(s) failed" in again.stderr


@pytest.mark.parametrize("overrides, swept, expected", [
    (["model=dlrm_small", "seed=1", "budget.flops=0.5"], {"seed", "budget.flops"}, "3-budget.flops=0.5,seed=1"),
    # a list value is no sweep; a path is named by its last component
    (["latency.batches=[1,256]", "pretrained=/very/deep/dir/dense.ckpt"], {"pretrained"}, "3-pretrained=dense.ckpt"),
    (["seed=1"], set(), "3"),
    (["+extra/group=x"], {"+extra/group"}, "3-+extra_group=x"),
])
def test_member_name_names_the_swept_keys_only(overrides, swept, expected):
    assert sweep.member_name(3, overrides, swept) == expected


def test_member_names_stay_short_and_distinct():
    long_a = "/x/" + "y" * 300 + "/" + "run_" + "a" * 80
    long_b = "/x/" + "y" * 300 + "/" + "run_" + "a" * 79 + "b"
    names = [sweep.member_name(0, [f"loader.cache_root={v}", "seed=1"], {"loader.cache_root"})
             for v in (long_a, long_b)]
    assert names[0] != names[1] and all(len(n) <= sweep.MAX_VALUE + 30 for n in names)
    assert names[0].startswith("0-loader.cache_root=run_aaa")
    many = [f"key_{i}=" + "v" * 30 for i in range(20)]
    name = sweep.member_name(12, many, {f"key_{i}" for i in range(20)})
    assert len(name) <= sweep.MAX_NAME and name.startswith("12-key_0=")


def test_swept_keys_come_from_sweep_syntax():
    assert sweep.swept_keys_of(["seed=0,1", "latency.batches=[1,256]", "a=range(3)", "b=choice(x,y)",
                                "mode=dense", "+c=glob(*)", "loader.limit_rows={train:2,val:1}"]) == {
        "seed", "a", "b", "+c"}


@pytest.fixture(autouse=True)
def _no_hydra_config_left_behind():
    yield
    HydraConfig.instance().cfg = None


def _hydra_cfg(tmp_path, mode: RunMode):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["seed=1"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path)
        cfg.hydra.mode = mode
        cfg.hydra.job.num = 7
    return cfg


@pytest.mark.parametrize("mode", [RunMode.RUN, RunMode.MULTIRUN])
def test_train_py_returns_the_validation_auc(tmp_path, monkeypatch, mode):
    import train
    import umec_lightning.run

    monkeypatch.setattr(umec_lightning.run, "run", lambda cfg, run_dir: {"val_auc": 0.75, "test_auc": 0.5})
    cfg = _hydra_cfg(tmp_path, mode)
    HydraConfig.instance().set_config(cfg)
    assert train.main.__wrapped__(cfg) == 0.75


@pytest.mark.parametrize("error", [USER_ERRORS[0]("bad value for `seed`"), RuntimeError("a bug")])
def test_a_failed_member_returns_nan_and_writes_failed_json(tmp_path, monkeypatch, error):
    def broken(cfg, run_dir):
        raise error

    (tmp_path / "failed.json").write_text("stale")
    cfg = _hydra_cfg(tmp_path, RunMode.MULTIRUN)
    monkeypatch.setattr(sweep, "_swept_keys", {"seed"})
    value = sweep.run_member(broken, cfg, cfg.hydra, USER_ERRORS)
    assert math.isnan(value)
    failed = json.loads((tmp_path / "failed.json").read_text())
    assert failed["swept"] == ["seed=1"] and failed["job"] == 7 and "seed=1" in failed["overrides"]
    assert failed["error"] == f"{type(error).__name__}: {error}"
    assert failed["user_error"] is isinstance(error, USER_ERRORS)
    assert ("traceback" in failed) is not isinstance(error, USER_ERRORS)
    assert not list(tmp_path.glob(".failed.json.*"))  # written atomically: no temporary left behind


def test_the_sweep_status_callback_exits_1_only_when_a_member_of_this_sweep_failed(tmp_path):
    cfg = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}, "overrides": {"task": ["seed=0,1"]}}})
    (tmp_path / "0-seed=0").mkdir()
    callback = sweep.SweepStatus()
    callback.on_multirun_start(config=cfg)
    assert sweep._swept_keys == {"seed"}
    callback.on_multirun_end(config=cfg)  # nothing failed: returns
    assert sweep._swept_keys is None
    callback.on_multirun_start(config=cfg)
    (tmp_path / "1-seed=1").mkdir()
    (tmp_path / "1-seed=1" / "failed.json").write_text("{}")
    with pytest.raises(SystemExit) as exc:
        callback.on_multirun_end(config=cfg)
    assert exc.value.code == 1


def test_a_diverged_run_ends_in_one_line_naming_the_step_and_the_checkpoint(tmp_path, cache_dir):
    """A NaN loss is not a bug to debug in a traceback: `train.py` says where it diverged, in one line."""
    cmd = [sys.executable, "train.py", *SMALL, f"loader.cache_root={cache_dir}", TINY_ROWS, "optim.lr=1e30",
           "mode=joint", "budget.flops=0.5", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "step" in errors[0] and "checkpoint" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


# 20 s: the launcher under load is tests/pipeline/test_parallel_sweep.py (slow too); the basic launcher stays in CI
@pytest.mark.slow
def test_a_multirun_on_the_submitit_launcher(tmp_path, cache_dir):
    """The cluster path (`hydra/launcher=submitit_slurm`) through its local twin: every member runs as a
    submitit job in its own process and writes its summary (the `cluster` extra, which `make setup` installs)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", *SMALL, f"loader.cache_root={cache_dir}", TINY_ROWS, "seed=0,1",
           "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    members = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / "summary.json").exists())
    assert [m.name for m in members] == ["0-seed=0", "1-seed=1"]
    summaries = [read_summary(m) for m in members]
    assert [s["seed"] for s in summaries] == [0, 1] and all(0 < s["val_auc"] <= 1 for s in summaries)
    assert (sweep_dir / ".submitit").is_dir()  # the jobs went through submitit


def test_the_objective_of_a_rank_that_evaluated_nothing_is_nan():
    """Under trainer=torchrec a quantize stage evaluates on rank 0 alone: the other ranks' summaries hold no
    val_auc, and train.py must still end them cleanly (it raised KeyError after the run had finished)."""
    from umec_lightning.sweep import objective

    assert objective({"val_auc": 0.75}) == 0.75
    assert math.isnan(objective({"mode": "quant_int8"}))
