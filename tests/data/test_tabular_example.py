"""`python train.py data=tabular_example` works from a fresh clone: data/example.csv is shipped, and it is what
bench/tabular_example.py writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from bench.tabular_example import main as write_example
from umec_lightning.data import build_cache, load_meta

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "data" / "example.csv"


def test_the_shipped_example_is_the_generators_output(tmp_path):
    write_example(["--out", str(tmp_path / "example.csv")])
    assert (tmp_path / "example.csv").read_bytes() == EXAMPLE.read_bytes()
    ignored = subprocess.run(["git", "check-ignore", "-q", str(EXAMPLE)], cwd=ROOT, capture_output=True)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 1  # not hidden by .gitignore: a fresh clone has it


def test_the_example_config_reads_it(tmp_path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["data=tabular_example"])
    cache = build_cache(instantiate(cfg.data, progress=False), tmp_path)
    meta = load_meta(cache)
    assert meta.name == "tabular_example" and meta.rows == {"train": 400, "val": 50, "test": 50}
    assert meta.dense_names == ["age", "price"] and meta.sparse_names == ["country", "device", "campaign"]
    assert meta.table_sizes == [9, 4, 13]  # "NA" (Namibia) is a country like the 7 others
    label = np.load(cache / "train_label.npy")
    assert 0.1 < label.mean() < 0.5


def test_train_py_runs_on_it(tmp_path):
    cmd = [sys.executable, "train.py", "data=tabular_example", "logger=csv", f"loader.cache_root={tmp_path / 'c'}",
           "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data"]["name"] == "tabular_example" and 0.0 < summary["test_auc"] <= 1.0
