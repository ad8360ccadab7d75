"""trainer=torchrec through the real pipeline: two gloo processes, tables sharded by torchrec's DMP.

Tolerances. A 2-rank step at batch 128 is the single-process step at batch 256 on the same rows (the ranks'
gradients are averaged, tables and MLPs alike), so the two runs differ only in float summation order
(per-rank means averaged vs one mean; all-reduce sums): ~1e-7 relative per step. Measured (124 steps, 2
epochs): |Δ test AUC| 2.1e-6, |Δ val AUC| 2.0e-6, Δ logloss < 1e-9. The bound 1e-4 on AUC (1e-5 on logloss)
is ~50x that, far below any real difference (a 1 % change of the tables' lr moves the logits by 3e-4 within
4 steps, test_module_equality).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

pytest.importorskip("torchrec")
pytest.importorskip("fbgemm_gpu")

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from umec_lightning.config import ConfigError  # noqa: E402
from umec_lightning.run import run  # noqa: E402
from umec_lightning.sharded.checkpoint import read_checkpoint, shard_path  # noqa: E402

from .conftest import ROOT, SHARDED, SINGLE, SMALL, compose_cfg, read_summary  # noqa: E402

METRICS = ("val_auc", "test_auc", "val_logloss", "test_logloss")
EPOCHS = "phases.pretrain_epochs=2"
HALF = "loader.limit_rows={train:7936,val:2000,test:2000}"  # 31 steps an epoch on 2 ranks (resume test)


def _env(cache_dir) -> dict:
    return {**os.environ, "UMEC_CACHE": str(cache_dir), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
            "PYTHONFAULTHANDLER": "1"}


def _close(sharded: dict, single: dict) -> None:
    assert sharded["steps"] == single["steps"] == 124
    assert sharded["test_auc"] == pytest.approx(single["test_auc"], abs=1e-4)
    assert sharded["val_auc"] == pytest.approx(single["val_auc"], abs=1e-4)
    assert sharded["test_logloss"] == pytest.approx(single["test_logloss"], abs=1e-5)
    assert sharded["test_auc"] > 0.55  # it learned something: the comparison is not of two untrained models


def test_train_py_sharded_dense_run_matches_one_process(tmp_path, cache_dir):
    sharded_dir, single_dir = tmp_path / "sharded", tmp_path / "single"
    cmd = [sys.executable, "train.py", *SMALL, *SHARDED, "mode=dense", EPOCHS, "trainer.sharding={default:table_wise,"
           "C3:row_wise,C10:row_wise}", f"hydra.run.dir={sharded_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sharded = read_summary(sharded_dir)
    # Per-rank table shards next to each checkpoint.
    best = sharded_dir / "checkpoints" / "pretrain" / "best.ckpt"
    assert best.exists() and all(shard_path(best, r, 2).exists() for r in (0, 1))
    single = run(compose_cfg([*SINGLE, "mode=dense", EPOCHS], cache_dir), single_dir)
    _close(sharded, single)
    # The sharded run's best checkpoint, gathered into a plain DLRM in one process, is the model it reported.
    again = run(compose_cfg([*SINGLE, "mode=dense", EPOCHS, f"pretrained={best}"], cache_dir), tmp_path / "pretrained")
    for key in METRICS:
        assert again[key] == pytest.approx(sharded[key], abs=1e-6), key


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, cache_dir: str, out: str, dense_ckpt: str) -> None:
    """Both ranks run the pipeline in-process (Lightning sees LOCAL_RANK and launches nothing): an
    uninterrupted run, a run stopped at the start of its second epoch then resumed, and a run that loads a
    single-process (unsharded) checkpoint with `pretrained=`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0", WANDB_MODE="offline")
    torch.set_num_threads(1)
    from pathlib import Path

    from umec_lightning.callbacks.interrupt import SimulatedInterruption

    base = [*SHARDED, "mode=dense", EPOCHS, HALF, "trainer.sharding=row_wise"]
    results = {"whole": run(compose_cfg(base, Path(cache_dir)), Path(out) / "whole")}
    resumed = Path(out) / "resumed"
    try:
        run(compose_cfg([*base, "debug.interrupt={phase:pretrain,epoch:1}"], Path(cache_dir)), resumed)
        raise AssertionError("the interrupted run did not stop")
    except SimulatedInterruption:
        pass
    results["interrupted_steps"] = torch.load(resumed / "checkpoints" / "pretrain" / "epoch-end.ckpt",
                                              weights_only=False)["global_step"]
    results["resumed"] = run(compose_cfg([*base, "resume=true"], Path(cache_dir)), resumed)
    pretrained = [*SHARDED, "mode=dense", EPOCHS, HALF, f"pretrained={dense_ckpt}"]
    results["pretrained"] = run(compose_cfg(pretrained, Path(cache_dir)), Path(out) / "pretrained")
    (Path(out) / f"results{rank}.json").write_text(json.dumps(results))


def test_sharded_resume_ends_like_an_uninterrupted_run_and_dense_checkpoints_load(tmp_path, cache_dir):
    single = run(compose_cfg([*SINGLE, "mode=dense", EPOCHS, HALF], cache_dir), tmp_path / "single")
    mp.spawn(_worker, args=(_free_port(), str(cache_dir), str(tmp_path), single["best_checkpoint"]), nprocs=2)
    results = [json.loads((tmp_path / f"results{r}.json").read_text()) for r in (0, 1)]
    for key in METRICS:  # every rank reports the synced metrics
        assert results[0]["whole"][key] == results[1]["whole"][key], key
    whole, resumed = results[0]["whole"], results[0]["resumed"]
    assert results[0]["interrupted_steps"] == 31  # stopped after its first epoch's checkpoint
    assert whole["steps"] == resumed["steps"] == 62
    for key in METRICS:
        assert resumed[key] == whole[key], key  # exactly: the resumed run computes what the whole one did
    best = [read_checkpoint(tmp_path / d / "checkpoints" / "pretrain" / "best.ckpt")["state_dict"]
            for d in ("whole", "resumed")]
    assert set(best[0]) == set(best[1])
    for key in best[0]:
        assert torch.equal(best[0][key], best[1][key]), key
    # A single-process checkpoint loaded into the sharded model evaluates as it did in one process.
    for key in METRICS:
        assert results[0]["pretrained"][key] == pytest.approx(single[key], abs=1e-6), key


def test_compression_under_torchrec_is_refused_before_any_work(tmp_path, cache_dir):
    cmd = [sys.executable, "train.py", *SMALL, "trainer=torchrec", "mode=joint", "budget.flops=0.5",
           f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path / "no-cache"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: trainer=torchrec"), proc.stderr[-2000:]
    assert "mode=joint" in lines[0]
    assert not (tmp_path / "no-cache").exists() and not (tmp_path / "run_config.json").exists()  # no work done


def test_torchrec_refuses_an_optimizer_the_fused_tables_cannot_match(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match="trainer=torchrec.*plain SGD"):
        run(compose_cfg(["trainer=torchrec", "mode=dense", "optim=adam"], cache_dir), tmp_path)
