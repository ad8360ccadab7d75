"""A sweep over one resource compresses to that resource alone. An experiment sets its own budget, in its sweep
(`hydra.sweeper.params`, e.g. `budget.flops: 0.1,0.3,0.5`: umec_lightning.sweep.drop_unasked_budgets, run by the
SweepStatus callback when the multirun starts) or in a config file (an arm, an experiment's body:
null_unasked_budgets, run by train.py); a command line that names another budget drops it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from umec_lightning import sweep

from .conftest import CONF, ROOT, SMALL, read_summary


def _multirun_config(overrides: list[str]):
    """The config a multirun starts from: the command line's overrides, the experiment's sweeper params."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("command_line, dropped, kept", [
    (["experiment=frappe", "budget.flops=0.5"], ["budget.params=0.5"], {"mode", "seed"}),
    (["experiment=paper_fig2", "budget.params=0.3"], ["budget.flops=0.1,0.3,0.5"], {"mode", "seed"}),
    (["experiment=paper_fig2", "+budget.params=0.3"], ["budget.flops=0.1,0.3,0.5"], {"mode", "seed"}),
    # naming both keeps both; naming none keeps the experiment's; the old workaround still works
    (["experiment=frappe", "budget.flops=0.5", "budget.params=0.5"], [], {"mode", "seed", "budget.params"}),
    (["experiment=frappe", "mode=joint"], [], {"mode", "seed", "budget.params"}),
    (["experiment=paper_fig2", "budget.flops=null", "budget.params=0.3"], [], {"mode", "seed", "budget.flops"}),
])
def test_the_sweep_keeps_the_budgets_the_command_line_asks_for(command_line, dropped, kept):
    cfg = _multirun_config(command_line)
    assert sweep.drop_unasked_budgets(cfg) == dropped
    assert set(cfg.hydra.sweeper.params) == kept


def test_the_callback_drops_them_before_the_sweeper_is_made(tmp_path):
    cfg = _multirun_config(["experiment=frappe", "budget.flops=0.5", f"hydra.sweep.dir={tmp_path}"])
    sweep.SweepStatus().on_multirun_start(config=cfg)
    try:
        assert "budget.params" not in cfg.hydra.sweeper.params
    finally:
        sweep._swept_keys = None


@pytest.mark.parametrize("command_line, dropped, budget", [
    (["budget.params=0.5"], ["budget.flops=0.9"], {"flops": None, "params": 0.5, "bytes": None}),
    ([], [], {"flops": 0.9, "params": None, "bytes": None}),
    (["budget.params=0.5", "budget.flops=0.8"], [], {"flops": 0.8, "params": 0.5, "bytes": None}),
])
def test_a_run_keeps_the_config_files_budget_unless_the_command_line_names_another(command_line, dropped, budget):
    cfg = _multirun_config(["experiment=paper_fig4", "+arm=fig4_input_selection_0.9", *command_line])
    assert sweep.null_unasked_budgets(cfg, cfg.hydra.overrides.task) == dropped
    assert dict(cfg.budget) == budget


@pytest.mark.slow  # ~8 s; the multirun below drops a budget the same way
def test_train_py_drops_the_config_files_budget(tmp_path, cache_dir):
    cmd = [sys.executable, "train.py", "experiment=paper_fig4", "+arm=fig4_input_selection_0.9", "budget.params=0.5",
           *SMALL, f"loader.cache_root={cache_dir}", "loader.limit_rows={train:2000,val:1000,test:1000}",
           "reference.dir=null", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = read_summary(tmp_path)
    assert summary["mode"] == "input_selection" and summary["budget"] == {"params": 0.5}


def test_a_multirun_naming_one_budget_compresses_to_it_alone(tmp_path, cache_dir):
    """experiment=paper_fig2 sweeps budget.flops 0.1/0.3/0.5; `budget.params=0.5` on the command line is one member
    at the params budget alone (without the callback: three members, each with both budgets)."""
    sweep_dir = tmp_path / "sweep"
    cmd = [sys.executable, "train.py", "-m", "experiment=paper_fig2", *SMALL, f"loader.cache_root={cache_dir}",
           "loader.limit_rows={train:2000,val:1000,test:1000}", "reference.dir=null", "mode=magnitude", "seed=0",
           "budget.params=0.5", f"hydra.sweep.dir={sweep_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    members = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    assert [m.name for m in members] == ["0-mode=magnitude,seed=0"], out[-3000:]
    summary = read_summary(members[0])
    assert summary["budget"] == {"params": 0.5}
    assert summary["params_ratio"] <= 0.5 + 1e-6 and summary["budget_met"] is True
    assert "budget.flops=0.1,0.3,0.5 dropped" in out
