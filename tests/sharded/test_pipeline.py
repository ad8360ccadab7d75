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

from umec_lightning import load_compressed  # noqa: E402
from umec_lightning.config import ConfigError  # noqa: E402
from umec_lightning.models import DLRMStructure, measure  # noqa: E402
from umec_lightning.run import run  # noqa: E402
from umec_lightning.sharded.checkpoint import read_checkpoint, shard_path  # noqa: E402
from umec_lightning.sharded.ebc import padded_width  # noqa: E402

from .conftest import ROOT, ROWS, SHARDED, SINGLE, SMALL, compose_cfg, read_summary  # noqa: E402

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


@pytest.mark.slow  # ~20 s; the resume test below runs train.py under torchrec in the default run
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
    # And resharded: the 2-rank table-/row-wise checkpoint into 1 rank, column-wise.
    one_dir = tmp_path / "one_rank"
    cmd = [sys.executable, "train.py", *SMALL, "trainer=torchrec", "trainer.devices=1", ROWS, "mode=dense",
           f"pretrained={best}", "trainer.sharding=column_wise", f"hydra.run.dir={one_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(cache_dir), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for key in METRICS:
        assert read_summary(one_dir)[key] == pytest.approx(sharded[key], abs=1e-6), key


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


def _kept(run_dir, rank=None) -> dict:
    name = "kept.json" if rank is None else f"kept_rank{rank}.json"
    return json.loads((run_dir / name).read_text())


def _table_bytes(s) -> int:
    """What the shards of a structure's tables take in all: rows x stored width padded for fbgemm, fp32."""
    return sum(rows * padded_width(d) * 4 for rows, d in zip(s.table_sizes, s.stored_dims))


@pytest.mark.slow  # ~18 s; tests/sharded/test_module_equality.py checks the sharded step in the default run
def test_joint_under_torchrec_learns_the_single_process_structure(tmp_path, cache_dir):
    """mode=joint, 2 ranks at batch 128 vs 1 process at 256 on the same rows: rank 0 (which alone holds the
    tables of record) decides the structure the one process decides, from an ADMM state (s, y, z) that
    both ranks hold bit for bit and that agrees with the one process's to float summation order. The Taylor
    completion's scores are rank 0's on the global batches of both ranks (`global_train_batches`), so even a
    structure the completion finishes is the one process's. Rank 1 never holds a table: its extracted
    model has meta tables and the same dense weights as rank 0's.

    The finetune stage only evaluates the extracted model (0 epochs): a finetune at this size and lr 1.0 is
    chaotic (measured: test AUC 0.6674 sharded, 0.6704 under trainer=ddp, 0.6695 in one process after one
    epoch, from extracted models whose weight sums agree to 1e-7), so it would compare noise.

    Under the paper's ADMM steps (`admm.schedule=paper`): on this 62-step stage the default relative schedule
    steps the resource dual 16x harder and s without momentum, which carries float summation-order differences
    further (measured: same structure, ADMM states within 1e-5, extracted weight sums 3e-4 apart instead of
    1e-7). What this test checks is the sharding, not that controller's sensitivity. And with Taylor scores
    for every set: joint's default held-out feature scores are measured on each rank's own validation shard
    (averaged), which are other rows than one process's first validation batches."""
    budget = ["mode=joint", "budget.flops=0.5", "phases.finetune_epochs=0", "mode.method.admm.schedule=paper",
              "mode.method.admm.group_score=taylor"]
    sharded_dir = tmp_path / "sharded"
    cmd = [sys.executable, "train.py", *SMALL, *SHARDED, *budget, f"hydra.run.dir={sharded_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(cache_dir), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = run(compose_cfg([*SINGLE, *budget], cache_dir), tmp_path / "single")
    sharded = read_summary(sharded_dir)
    ranks = [_kept(sharded_dir, r) for r in (0, 1)]
    assert ranks[0]["kept"] == ranks[1]["kept"] == _kept(tmp_path / "single")["kept"]
    assert ranks[0]["state"] == ranks[1]["state"]  # replicated: identical on both ranks, bit for bit
    assert ranks[0]["state"] == pytest.approx(_kept(tmp_path / "single")["state"], abs=1e-5)
    assert sharded["budget_met"] is True and sharded["flops"] == single["flops"]
    assert sharded["features_removed"] == single["features_removed"] and sharded["features_removed"]
    assert ranks[0]["weight_sum"] == pytest.approx(_kept(tmp_path / "single")["weight_sum"], rel=1e-6)
    assert [r["holds_tables"] for r in ranks] == [True, False] and "weight_sum" not in ranks[1]
    assert ranks[0]["dense_weight_sum"] == ranks[1]["dense_weight_sum"]  # rank 0's, broadcast
    assert sharded["test_auc"] == pytest.approx(single["test_auc"], abs=1e-4)
    assert sharded["test_auc"] > sharded["dense_test_auc"]  # compressing trained it (not an untrained pair)
    # The tables per rank, measured on the shards: the dense model's plan, then the extracted model's.
    tables = sharded["sharded_tables"]
    before, after = tables["pretrain"]["bytes_per_rank"], tables["finetune"]["bytes_per_rank"]
    assert all(a < b for a, b in zip(after, before))
    dense = read_checkpoint(sharded_dir / "checkpoints" / "pretrain" / "best.ckpt")["dlrm_structure"]
    assert sum(before) == _table_bytes(DLRMStructure.from_dict(dense))
    assert sum(after) == _table_bytes(load_compressed(sharded_dir / "compressed.pt").structure)
    removed = set(sharded["features_removed"])
    assert removed <= set(tables["pretrain"]["sharding"]) and not removed & set(tables["finetune"]["sharding"])


# Every other mode (one method or a chain of them), from one sharded dense checkpoint, with its own budget.
# CORE runs in `make test` (held-out scores through the sharded forward), with the compress-stage resume;
# the rest in the slow test (`make test-slow`).
CORE = ("input_selection",)
MODES = {
    "input_selection": ["mode=input_selection", "budget.flops=0.9"],
    "embedding_reduction": ["mode=embedding_reduction", "budget.params=0.6"],
    "cascaded": ["mode=cascaded", "budget.flops=0.6"],
    "taylor": ["mode=taylor", "budget.flops=0.5", "mode.method.steps_per_round=5"],
    "magnitude": ["mode=magnitude", "budget.flops=0.5"],
    "group_lasso": ["mode=group_lasso", "mode.method.lam=0.05", "mode.method.threshold=0.05"],
    "handcrafted": ["mode=handcrafted", "budget.flops=0.5"],
    "mixed_dim": ["mode=mixed_dim", "budget.params=0.5"],
    "lowrank_svd": ["mode=lowrank_svd", "budget.params=0.5"],
    "lowrank_feature": ["mode=lowrank_feature", "budget.params=0.5", "mode.method.calibration_batches=5"],
    "joint_lowrank": ["mode=joint_lowrank", "budget.params=0.5", "mode.method.calibration_batches=5"],
}


def _modes_worker(rank: int, port: int, cache_dir: str, out: str, names: list[str], resume: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0", WANDB_MODE="offline")
    torch.set_num_threads(1)
    from pathlib import Path

    base = [*SHARDED, HALF, "phases.pretrain_epochs=1", "phases.compress_epochs=1", "phases.finetune_epochs=1",
            "trainer.sharding={default:table_wise,C3:row_wise,C5:column_wise}"]
    dense = run(compose_cfg([*base, "mode=dense"], Path(cache_dir)), Path(out) / "dense")
    pretrained = f"pretrained={dense['best_checkpoint']}"
    for name in names:
        run(compose_cfg([*base, *MODES[name], pretrained], Path(cache_dir)), Path(out) / name)
    if not resume:
        return
    # mode=joint under Adagrad killed at the start of its second compress epoch, then resumed: the
    # compression state, the table shards and the fused Adagrad's accumulators come back from the checkpoint.
    from umec_lightning.callbacks.interrupt import SimulatedInterruption

    joint = [*base, "mode=joint", "budget.flops=0.5", "phases.compress_epochs=2", pretrained, "optim=adagrad",
             "optim.lr=0.1"]
    run(compose_cfg(joint, Path(cache_dir)), Path(out) / "joint_whole")
    try:
        run(compose_cfg([*joint, "debug.interrupt={phase:compress,epoch:1}"], Path(cache_dir)), Path(out) / "joint")
        raise AssertionError("the interrupted run did not stop")
    except SimulatedInterruption:
        pass
    run(compose_cfg([*joint, "resume=true"], Path(cache_dir)), Path(out) / "joint")


def _check_modes(tmp_path, names) -> None:
    """Each mode compressed the sharded dense model on 2 ranks: the ranks decided the same structure, the
    budget is met on the saved model, and the final model's shards are what its tables need."""
    for name in names:
        run_dir = tmp_path / name
        summary = read_summary(run_dir)
        records = sorted(run_dir.glob("kept_rank*.json"))
        # handcrafted decides from shapes before training (a scratch stage): no per-rank decision to record.
        assert len(records) == (0 if name == "handcrafted" else 2), name  # the last compress stage's
        for r0, r1 in zip(records[0::2], records[1::2]):
            assert json.loads(r0.read_text())["kept"] == json.loads(r1.read_text())["kept"], name
        model = load_compressed(run_dir / "compressed.pt")
        cost = measure(model)
        assert (cost.flops, cost.params) == (summary["flops"], summary["params"]), name
        if summary["budget"]:
            assert summary["budget_met"] is True, name
        else:
            assert summary["flops_ratio"] < 1 or summary["params_ratio"] < 1, name
        tables = summary["sharded_tables"]
        first, last = list(tables.values())[0], list(tables.values())[-1]  # the dense model, the final one
        assert sum(last["bytes_per_rank"]) == _table_bytes(model.structure), name
        assert sum(last["bytes_per_rank"]) <= sum(first["bytes_per_rank"]), name


# 40 s: sharded joint (test_joint_under_torchrec_learns_...) and sharded resume (test_sharded_resume_...) stay in CI
@pytest.mark.slow
def test_input_selection_and_a_resumed_joint_run_under_torchrec(tmp_path, cache_dir):
    """input_selection as `_check_modes` checks a mode, and a joint run (under optim=adagrad: fused Adagrad
    for the tables) killed in its compress stage and resumed ends as the uninterrupted one."""
    mp.spawn(_modes_worker, args=(_free_port(), str(cache_dir), str(tmp_path), list(CORE), True), nprocs=2)
    _check_modes(tmp_path, CORE)
    whole, resumed = read_summary(tmp_path / "joint_whole"), read_summary(tmp_path / "joint")
    assert resumed["stages"]["compress"]["steps"] == whole["stages"]["compress"]["steps"] == 62
    for r in (0, 1):  # each rank's own decision and ADMM state, exactly as without the interruption
        assert _kept(tmp_path / "joint", r) == _kept(tmp_path / "joint_whole", r)
    assert resumed["kept"] == whole["kept"] and resumed["test_auc"] == whole["test_auc"]


@pytest.mark.slow
def test_every_other_mode_runs_under_torchrec(tmp_path, cache_dir):
    others = [name for name in MODES if name not in CORE]
    mp.spawn(_modes_worker, args=(_free_port(), str(cache_dir), str(tmp_path), others, False), nprocs=2)
    _check_modes(tmp_path, others)


def test_torchrec_refuses_an_optimizer_the_fused_tables_cannot_match(tmp_path, cache_dir):
    with pytest.raises(ConfigError, match="trainer=torchrec.*plain SGD"):
        run(compose_cfg(["trainer=torchrec", "mode=dense", "optim=adam"], cache_dir), tmp_path)


def _regularized_worker(rank: int, port: int, cache_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0", WANDB_MODE="offline")
    torch.set_num_threads(1)
    from pathlib import Path

    overrides = [*SHARDED, HALF, "model.top=[32,16,1]", "model.batch_norm=true", "model.dropout=0.2",
                 "mode=joint", "budget.flops=0.5", "phases.finetune_epochs=1"]
    run(compose_cfg(overrides, Path(cache_dir)), Path(out) / "joint_regularized")


@pytest.mark.slow
def test_the_regularized_model_compresses_under_torchrec(tmp_path, cache_dir):
    """Batch norm and dropout in the MLPs (data-parallel in DMP's DDP) with the tables sharded: the ranks decide
    one structure, the budget is met on the saved model, whose kept neurons keep their norm channels."""
    mp.spawn(_regularized_worker, args=(_free_port(), str(cache_dir), str(tmp_path)), nprocs=2)
    _check_modes(tmp_path, ["joint_regularized"])
    summary = read_summary(tmp_path / "joint_regularized")
    model = load_compressed(tmp_path / "joint_regularized" / "compressed.pt")
    assert model.structure.batch_norm == ["dense.layers.0", "over.layers.0", "over.layers.1"]
    assert model.over.norms[0].num_features == summary["kept"]["neurons"]["over.layers.0"]
    assert summary["test_auc"] > 0.55
