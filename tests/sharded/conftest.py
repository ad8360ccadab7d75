"""Shared by the sharded (trainer=torchrec) tests: the pipeline tests' small config and data cache."""

from tests.pipeline.conftest import ROOT, SMALL, cache_dir, compose_cfg, read_summary  # noqa: F401

# 124 training batches of 128: 62 steps on 2 ranks, as many as one process takes at batch 256 (same rows
# per step: rank r takes batches r, r+2, ... of the same seeded permutation); eval rows split evenly.
ROWS = "loader.limit_rows={train:15872,val:2000,test:2000}"
SHARDED = ["trainer=torchrec", "trainer.devices=2", ROWS]
SINGLE = ["trainer=cpu", "loader.batch_size=256", ROWS]
