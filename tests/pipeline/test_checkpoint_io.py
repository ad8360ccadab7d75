"""Checkpoints and model files are written atomically; a full disk is one line naming the file and the bytes it
needs, and leaves the old file; a resume passes over a damaged checkpoint to the previous one (checkpoint_io.py).

A full disk without root: the writing process gets a file-size limit (`RLIMIT_FSIZE`, SIGXFSZ ignored), so a write
past it fails with EFBIG, which the writer treats as ENOSPC. Nothing in the writer is replaced for the test.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch

from umec_lightning.checkpoint_io import AtomicCheckpointIO, previous_path, resume_point
from umec_lightning.run import build_datamodule

from .conftest import ROOT, SMALL, compose_cfg

TINY_ROWS = "loader.limit_rows={train:3000,val:1000,test:1000}"
# Runs `python <args>` with every file this process writes limited to LIMIT bytes (a full disk, per file).
LIMITED = """
import resource, runpy, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of killing
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
SAVE_TWICE = """
import sys, torch
from umec_lightning.checkpoint_io import AtomicCheckpointIO
from umec_lightning.io import DiskFullError
path = sys.argv[1]
io = AtomicCheckpointIO()
io.save_checkpoint({"state_dict": {"w": torch.zeros(1_000)}, "global_step": 1}, path)  # 5 kB: fits
try:
    io.save_checkpoint({"state_dict": {"w": torch.zeros(100_000)}, "global_step": 2}, path)  # 400 kB: does not
except DiskFullError as err:
    print(err)
    sys.exit(3)
"""


def _limited(limit: int, *argv: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LIMITED, str(limit), *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_a_full_disk_is_one_line_with_the_bytes_needed_and_the_old_checkpoint_stays(tmp_path):
    script = tmp_path / "save_twice.py"
    script.write_text(SAVE_TWICE)
    path = tmp_path / "ckpt" / "epoch-end.ckpt"
    proc = _limited(100_000, str(script), str(path))
    assert proc.returncode == 3, proc.stderr[-3000:]
    (line,) = proc.stdout.strip().splitlines()
    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(100_000)}, "global_step": 2}, buffer)
    assert str(path) in line and f"needs {len(buffer.getvalue()):,} bytes" in line, line
    # The old checkpoint is whole under its name, nothing half-written beside it.
    assert torch.load(path, weights_only=False)["global_step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["epoch-end.ckpt", "epoch-end.prev.ckpt"]


@pytest.mark.slow  # ~11 s: a whole run; the one-line error and the kept checkpoint are checked above in seconds
def test_a_full_disk_in_a_run_is_one_line_naming_the_checkpoint_and_a_resume_then_finishes(tmp_path, cache_dir):
    overrides = [*SMALL, f"loader.cache_root={cache_dir}", TINY_ROWS, "mode=dense", "phases.pretrain_epochs=2"]
    build_datamodule(compose_cfg(overrides[len(SMALL):], cache_dir)).ensure_ready()  # the cache is not what fills up
    run_dir = tmp_path / "run"
    # 64 kB: the logs, configs and predictions fit, a checkpoint (~116 kB) does not.
    proc = _limited(64_000, "train.py", *overrides, f"hydra.run.dir={run_dir}", timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert re.search(rf"disk full writing {re.escape(str(run_dir / 'checkpoints' / 'pretrain'))}/\S+\.ckpt: it needs "
                     r"[\d,]+ bytes", line), line
    # No checkpoint under its final name (a truncated one broke the resume), no temporary file left.
    assert [p.name for p in (run_dir / "checkpoints" / "pretrain").iterdir()] == []
    failed = json.loads((run_dir / "failed.json").read_text())
    assert failed["error"].startswith("DiskFullError: disk full writing") and failed["user_error"] is True
    resumed = subprocess.run([sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}", "resume=true"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["epochs_run"] == 2
    assert not (run_dir / "failed.json").exists()


def _checkpoint(step: int) -> dict:
    return {"state_dict": {"w": torch.full((10,), float(step))}, "global_step": step,
            "loops": {"fit_loop": {"epoch_loop.state_dict": {"_batches_that_stepped": step}}}}


def test_a_resume_passes_over_a_damaged_checkpoint_to_the_previous_one(tmp_path, caplog):
    folder = tmp_path / "checkpoints" / "compress"
    path = folder / "epoch-end.ckpt"
    writer = AtomicCheckpointIO()
    writer.save_checkpoint(_checkpoint(24), path)
    writer.save_checkpoint(_checkpoint(48), path)  # the one of step 24 stays as epoch-end.prev.ckpt
    assert resume_point(folder) == (path, 48)
    # What a non-atomic copy left on a full disk: the first half of the file under its final name.
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        assert resume_point(folder) == (previous_path(path), 24)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert str(path) in warning and "cannot be read" in warning and "resuming from the previous one" in warning
    assert (folder / "epoch-end.ckpt.damaged").read_bytes() == data[: len(data) // 2]  # kept, out of the way
    # The resumed fit writes the next epoch-end; the good previous one is not replaced by the damaged file.
    writer.save_checkpoint(_checkpoint(48), path)
    assert torch.load(previous_path(path), weights_only=False)["global_step"] == 24
    # With no readable checkpoint the stage starts over, said in one line.
    for p in (path, previous_path(path)):
        p.write_bytes(b"not a checkpoint")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert resume_point(folder) is None
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "starts over" in warning
