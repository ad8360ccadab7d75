"""Real DDP: two CPU processes (gloo) through train.py. The compression state must stay identical on
both ranks, and both must extract the same model."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import ROOT, SMALL


# joint and input_selection: the Taylor warm-up under DDP (gradients are averaged over the ranks). Both once
# failed ~1 run in 5 (one rank aborted with "malloc(): unaligned tcache chunk detected" in the first backward,
# in the dense pretrain stage): DDP's own gloo sparse all-reduce; the all-gather comm hook
# (umec_lightning/distributed.py) replaced it, and 20 of 20 runs passed.
@pytest.mark.parametrize("mode, budget", [("joint", 0.5), ("input_selection", 0.9)])
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
