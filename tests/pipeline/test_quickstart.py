"""`make train`'s run (experiment=quickstart) through train.py as users start it, shrunk by overrides: the config
composes, the run ends with a compressed model and its exports, the console ends with a table that says what
summary.json says, and progress bars appear on a terminal only."""

from __future__ import annotations

import fcntl
import os
import re
import struct
import subprocess
import sys
import termios

import pytest
import torch
from hydra import compose, initialize_config_dir

from umec_lightning import load_compressed
from umec_lightning.compression.export import random_inputs
from umec_lightning.models import measure
from umec_lightning.run import progress_bar_enabled

from .conftest import CONF, ROOT, SMALL, read_summary

# SMALL, less the progress-bar switch: these tests check what the default does.
TINY = [o for o in SMALL if not o.startswith("trainer.enable_progress_bar")]


def test_quickstart_composes_and_the_default_config_stays_dense():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        quick = compose("config", overrides=["experiment=quickstart"])
        plain = compose("config")
    assert quick.mode.name == "joint" and quick.budget.flops == 0.5 and quick.budget.params is None
    assert quick.data.name == "synthetic" and quick.data.rows.train == 200_000
    assert quick.export.torchscript and quick.export.onnx
    assert quick.reference.dir is not None  # the equal-epochs dense control
    # `python train.py` with no arguments: the dense model on the full default data, nothing exported.
    assert plain.mode.name == "dense" and plain.data.rows.train == 1_500_000
    assert not plain.export.torchscript and not plain.export.onnx
    assert quick.trainer.enable_progress_bar is None and plain.trainer.enable_progress_bar is None


def test_progress_bar_rule_on_a_real_terminal_and_a_pipe():
    leader, follower = os.openpty()
    read_end, write_end = os.pipe()
    with open(follower, "w") as tty, open(write_end, "w") as pipe:
        assert progress_bar_enabled(None, tty) is True
        assert progress_bar_enabled(None, pipe) is False
        # An explicit setting wins either way.
        assert progress_bar_enabled(False, tty) is False
        assert progress_bar_enabled(True, pipe) is True
    os.close(leader)
    os.close(read_end)


def table_rows(stdout: str) -> dict[str, str]:
    """The result table at the end of a run's console: {label: the rest of the line}."""
    lines = stdout.replace("\r\n", "\n").rstrip("\n").split("\n")
    start = max(i for i, line in enumerate(lines) if line.startswith("Result ("))
    rows = {}
    for line in lines[start + 1:]:
        assert line.startswith("  "), f"the console goes on after the table: {line!r}"
        match = re.match(r"  (\S.*?)\s{2,}(\S.*)$", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def numbers(text: str) -> list[str]:
    return re.findall(r"[+-]?\d+\.\d+", text)


def test_quickstart_through_train_py_ends_with_the_summary_table(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "train.py", "experiment=quickstart", *TINY, f"loader.cache_root={cache_dir}",
           f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_summary(run_dir)

    # The flagship: dense, then UMEC joint at flops 0.5, extracted, finetuned, exported.
    assert summary["mode"] == "joint" and summary["budget"] == {"flops": 0.5}
    assert summary["budget_met"] is True and summary["flops_ratio"] <= 0.5
    compress = summary["stages"]["compress"]
    assert compress["budget_met_by"] in ("admm", "extraction") and 0 <= compress["forced_share_of_reduction"] <= 1
    assert summary["dense_same_epochs"] == 3
    slim = load_compressed(run_dir / "compressed.pt")
    cost = measure(slim)
    assert cost.flops / summary["dense_flops"] == summary["flops_ratio"]
    assert cost.params / summary["dense_params"] == summary["params_ratio"]
    assert set(summary["exports"]) == {"torchscript", "onnx"} and "export_errors" not in summary
    scripted = torch.jit.load(summary["exports"]["torchscript"])
    dense, sparse = random_inputs(slim.structure, batch_size=16)
    with torch.no_grad():
        torch.testing.assert_close(scripted(dense, sparse), slim.eval()(dense, sparse), atol=1e-5, rtol=0)
    assert (run_dir / "compressed.onnx").stat().st_size > 0

    # Not a terminal: no progress bars (Lightning's bars write to stdout).
    assert "it/s" not in proc.stdout and "\r" not in proc.stdout and "it/s" not in proc.stderr

    # The console ends with the table, and it says what summary.json says.
    rows = table_rows(proc.stdout)
    assert numbers(rows["dense model"]) == [f"{summary['dense_test_auc']:.4f}", f"{summary['dense_test_logloss']:.4f}"]
    assert numbers(rows["dense model, 3 epochs"]) == [f"{summary['dense_same_epochs_test_auc']:.4f}",
                                                      f"{summary['dense_same_epochs_test_logloss']:.4f}"]
    assert numbers(rows["compressed model"]) == [f"{summary['test_auc']:.4f}", f"{summary['test_logloss']:.4f}"]
    assert numbers(rows["change vs dense"]) == [f"{summary['delta_test_auc']:+.4f}",
                                                f"{summary['delta_test_logloss']:+.4f}"]
    assert numbers(rows["change vs dense, 3 epochs"]) == [f"{summary['delta_test_auc_same_epochs']:+.4f}",
                                                          f"{summary['delta_test_logloss_same_epochs']:+.4f}"]
    assert numbers(rows["flops / dense"]) == [f"{summary['flops_ratio']:.3f}", "0.5"]  # the ratio, the budget
    assert rows["flops / dense"].endswith("budget 0.5")
    assert numbers(rows["params / dense"]) == [f"{summary['params_ratio']:.3f}"]
    assert rows["budget met"].startswith("yes")
    assert f"{compress['forced_share_of_reduction']:.1%}" in rows["budget met"] \
        or compress["budget_met_by"] == "admm"
    assert rows["quality collapse"].split()[0] == ("YES" if summary["quality_collapse"] else "no")
    assert f"{summary['lift_lost']:.1%}" in rows["quality collapse"]
    assert rows["run dir"] == str(run_dir)
    assert rows["summary"] == str(run_dir / "summary.json")
    assert rows["model file"] == str(run_dir / "compressed.pt")
    assert rows["export (torchscript)"] == summary["exports"]["torchscript"]
    assert rows["export (onnx)"] == summary["exports"]["onnx"] == str(run_dir / "compressed.onnx")


@pytest.mark.slow  # ~5 s under a pseudo-terminal; the table itself is checked through train.py above
def test_a_run_on_a_terminal_draws_progress_bars_and_ends_with_its_table(tmp_path, cache_dir):
    """stdout on a pseudo-terminal: the bars are on, as they were; the dense table follows them."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "train.py", *TINY, "trainer.limit_train_batches=20", f"loader.cache_root={cache_dir}",
           f"hydra.run.dir={run_dir}"]
    leader, follower = os.openpty()
    # A terminal of 24 x 120 characters (a fresh pty is 0 x 0, and tqdm draws a bar as wide as its terminal).
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    err_file = tmp_path / "stderr"
    with open(err_file, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=follower, stderr=err, stdin=subprocess.DEVNULL)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert proc.wait(timeout=300) == 0, err_file.read_text()[-3000:]
    stdout = b"".join(chunks).decode(errors="replace")
    assert "it/s" in stdout  # Lightning's bars
    summary = read_summary(run_dir)
    rows = table_rows(stdout)
    assert numbers(rows["dense model, 1 epoch"]) == [f"{summary['test_auc']:.4f}", f"{summary['test_logloss']:.4f}"]
    assert numbers(rows["oracle (planted truth)"]) == [f"{summary['oracle_auc']:.4f}"]
    assert rows["summary"] == str(run_dir / "summary.json") and "model file" not in rows


def test_the_table_says_what_the_control_trained_under_early_stopping(tmp_path):
    """Under early stopping the shared control is at most T epochs: the table names the epochs it really ran."""
    from umec_lightning.run import result_table

    summary = {"mode": "joint", "budget": {"flops": 0.5}, "flops_ratio": 0.5, "params_ratio": 0.6,
               "test_auc": 0.80, "test_logloss": 0.45, "dense_test_auc": 0.79, "dense_test_logloss": 0.46,
               "dense_same_epochs": 4, "dense_same_epochs_run": 1, "dense_same_epochs_test_auc": 0.795,
               "dense_same_epochs_test_logloss": 0.455, "delta_test_auc": 0.01, "delta_test_logloss": -0.01,
               "delta_test_auc_same_epochs": 0.005, "delta_test_logloss_same_epochs": -0.005, "budget_met": True}
    text = result_table(summary, tmp_path)
    assert "dense model, 1 of <=4 epochs" in text and "change vs dense, 1 of <=4 epochs" in text
    summary["dense_same_epochs_run"] = 4
    assert "dense model, 4 epochs" in result_table(summary, tmp_path)
