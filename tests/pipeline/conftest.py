"""Pipeline tests compose the real Hydra config (the one users run), then shrink it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"

# Small enough to run in seconds, big enough that the model learns something.
SMALL = [
    "model=dlrm_small",
    "logger=csv",
    "data.rows.train=16000",
    "data.rows.val=4000",
    "data.rows.test=4000",
    "loader.batch_size=128",
    "loader.eval_batch_size=4096",
    "trainer.enable_progress_bar=false",
    "latency.repeats=3",
    "latency.batches=[1,256]",
    "log_every_n_steps=10",
    # Small vocabularies and a large SGD step (MLPerf's lr) so 125 steps learn something real.
    "data.cardinalities=[3,4,10,20,50,100,200,300,500,1000,3,4,10,20,50,100,200,300,500,1000,10,20,50,100,200,500]",
    "optim.lr=1.0",
]


def compose_cfg(overrides: list[str], cache_dir: Path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=[*SMALL, f"loader.cache_root={cache_dir}", *overrides])


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())
