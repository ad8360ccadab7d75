"""Real DDP: two CPU processes (gloo) through train.py. The compression state must stay identical on
both ranks, and both must extract the same model."""

import json
import os
import subprocess
import sys

from .conftest import ROOT, SMALL


def test_ddp_two_processes_learn_the_same_structure(tmp_path, cache_dir):
    env = {**os.environ, "UMEC_CACHE": str(cache_dir), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "train.py", *SMALL, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
           "mode=joint", "budget.flops=0.5", "phases.finetune_epochs=1",
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
