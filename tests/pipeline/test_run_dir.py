"""The run dir (umec_lightning/run_dir.py): one run at a time, a used dir only with resume=true or overwrite=true, a
failed run says why in failed.json, and a resumed run's logs keep what its first part logged."""

from __future__ import annotations

import csv
import json
import logging
import os
import socket
import subprocess
import sys

import pytest

from umec_lightning.checkpoint_io import checkpoint_step, previous_path
from umec_lightning.config import ConfigError
from umec_lightning.run import run
from umec_lightning.run_dir import RunDirError, claim

from .conftest import ROOT, SMALL, compose_cfg, read_summary

TINY_ROWS = "loader.limit_rows={train:3000,val:1000,test:1000}"
JOINT = ["mode=joint", "budget.flops=0.5", "phases.finetune_epochs=1", TINY_ROWS, "latency.repeats=1"]


def _train_py(run_dir, cache_dir, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "train.py", *SMALL, f"loader.cache_root={cache_dir}", TINY_ROWS, *overrides,
           f"hydra.run.dir={run_dir}"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    return line


def test_a_second_run_into_a_run_dir_in_use_is_refused_naming_the_dir_and_its_holder(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    held = claim(run_dir, resume=False, overwrite=False)  # this process is the first run
    try:
        line = _one_error_line(_train_py(run_dir, cache_dir))
    finally:
        held.release()
    assert str(run_dir) in line and "in use by another run" in line, line
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in line, line
    # Refused before Hydra wrote into the dir: the first run's files are as they were.
    assert sorted(p.name for p in run_dir.iterdir()) == [".run.lock"]


def test_a_used_run_dir_is_refused_unless_resume_or_overwrite(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    run(compose_cfg(JOINT, cache_dir), run_dir)
    names = ("summary.json", "compressed.pt", "sparsity_history.json")
    before = {name: (run_dir / name).read_bytes() for name in names}
    # Another mode into the finished run's dir: refused through train.py before Hydra wrote .hydra/ or train.log ...
    line = _one_error_line(_train_py(run_dir, cache_dir, "mode=dense"))
    assert str(run_dir) in line and "finished run" in line and "resume=true" in line and "overwrite=true" in line
    assert not (run_dir / ".hydra").exists() and not (run_dir / "train.log").exists()
    # ... and through the API, which leaves no failed.json in a dir that is not its own.
    with pytest.raises(RunDirError, match="already holds the outputs of a finished run"):
        run(compose_cfg([TINY_ROWS, "mode=dense"], cache_dir), run_dir)
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    assert not (run_dir / "failed.json").exists()
    with pytest.raises(ConfigError, match="`resume` and `overwrite` are both true"):
        run(compose_cfg([TINY_ROWS, "mode=dense", "resume=true", "overwrite=true"], cache_dir), run_dir)
    # overwrite=true: the earlier run's outputs are gone, not left beside the new ones.
    summary = run(compose_cfg([TINY_ROWS, "mode=dense", "overwrite=true", "latency.repeats=1"], cache_dir), run_dir)
    assert summary["mode"] == "dense" and read_summary(run_dir)["mode"] == "dense"
    for name in ("compressed.pt", "sparsity_history.json", "sparsity_curves.png", "kept.json", "checkpoints/compress",
                 "phases/compress.json"):
        assert not (run_dir / name).exists(), name
    # overwrite clears run dirs only, never a folder of other files.
    other = tmp_path / "home"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"notes\.txt"):
        run(compose_cfg([TINY_ROWS, "mode=dense", "overwrite=true"], cache_dir), other)
    assert (other / "notes.txt").read_text() == "mine"


def test_a_failed_run_says_why_in_failed_json(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match="needs a budget"):
        run(compose_cfg(["mode=joint", TINY_ROWS], cache_dir), tmp_path)
    failed = json.loads((tmp_path / "failed.json").read_text())
    assert failed["error"].startswith("ConfigError: mode=joint needs a budget") and failed["user_error"] is True
    assert "\n" not in failed["error"]


def _rows(path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _logged(rows: list[dict], prefix: str) -> list[tuple]:
    """(step, column, value) of every value in the columns starting with `prefix`."""
    return sorted((row["step"], key, value) for row in rows for key, value in row.items()
                  if key.startswith(prefix) and value)


def _settled(folder, quiet_s: float = 1.0, limit_s: float = 60.0) -> dict:
    """{path: bytes} of the `.wandb` files in `folder` once no write has changed them for `quiet_s`: W&B's service
    process may still be flushing a finished run's file when `run` returns (seen on a loaded machine)."""
    import time

    def snapshot():
        return {p: p.read_bytes() for p in folder.rglob("*.wandb")}

    deadline, last = time.monotonic() + limit_s, snapshot()
    while time.monotonic() < deadline:
        time.sleep(quiet_s)
        now = snapshot()
        if now == last:
            return now
        last = now
    return last


def test_a_resumed_run_keeps_what_its_first_part_logged(tmp_path, cache_dir, caplog):
    """A real interrupted run (compress stopped at the start of its epoch 2), its last epoch-end checkpoint damaged
    as a non-atomic copy on a full disk left it, then resumed: the resume falls back to the previous epoch-end, and
    metrics.csv keeps the first part's pretrain curve and compress epoch 0 (Lightning's CSV logger deleted them);
    the first part's W&B offline run stays as it was."""
    overrides = [*JOINT, "phases.compress_epochs=3", "logger=default", "logger.wandb.mode=offline"]
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated interruption at compress epoch 2"):
        run(compose_cfg([*overrides, "debug.interrupt={phase:compress,epoch:2}"], cache_dir), run_dir)
    failed = json.loads((run_dir / "failed.json").read_text())
    assert failed["error"] == "SimulatedInterruption: simulated interruption at compress epoch 2"
    assert "traceback" in failed and failed["user_error"] is False
    first = _rows(run_dir / "csv" / "metrics.csv")
    (wandb_first,) = (run_dir / "wandb").glob("offline-run-*")
    wandb_files = _settled(wandb_first)
    checkpoint = run_dir / "checkpoints" / "compress" / "epoch-end.ckpt"
    resumed_from, last = checkpoint_step(previous_path(checkpoint)), checkpoint_step(checkpoint)  # ends of epochs 0, 1
    checkpoint.write_bytes(checkpoint.read_bytes()[:10_000])
    with caplog.at_level(logging.WARNING, logger="umec_lightning"):
        run(compose_cfg([*overrides, "resume=true"], cache_dir), run_dir)
    assert any("resuming from the previous one" in r.getMessage() for r in caplog.records)
    assert not (run_dir / "failed.json").exists()
    final = _rows(run_dir / "csv" / "metrics.csv")
    pretrain = _logged(first, "pretrain/")
    assert any(key == "pretrain/train_loss" for _, key, _ in pretrain)
    assert set(pretrain) <= set(_logged(final, "pretrain/"))  # the whole pretrain curve is still there
    # Compress: the first part's epoch 0 (up to the previous epoch-end) is kept; epoch 1 was trained again from there,
    # and each step is logged once.
    epoch0 = [x for x in _logged(first, "compress/") if int(x[0]) <= resumed_from]
    assert epoch0 and set(epoch0) <= set(_logged(final, "compress/"))
    steps = [(row["step"], key) for row in final for key, value in row.items()
             if key == "compress/train_loss" and value]
    assert len(steps) == len(set(steps)) and max(int(s) for s, _ in steps) > last
    assert {p: p.read_bytes() for p in wandb_first.rglob("*.wandb")} == wandb_files
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2
