"""The sweep of docs/sweeps.md with 3 members at a time, each in its own process (submitit's local launcher, in
batches of `hydra.sweeper.max_batch_size`), against one shared data cache and one shared dense reference: every member
finishes, the cache is built once, each dense control is trained once, no summary is lost."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys
import time

import pytest

from .conftest import ROOT, SMALL, read_summary

AT_A_TIME = 3
MODES, BUDGETS = ("joint", "magnitude", "taylor"), ("0.3", "0.5", "0.7")
# A compressed run's total epochs (its equal-epochs control): joint and taylor 1 + 1 + 1, magnitude 1 + 0 + 1.
TOTAL = {"joint": 3, "magnitude": 2, "taylor": 3}
LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]", re.MULTILINE)


def _span(log: str) -> tuple[dt.datetime, dt.datetime]:
    """First and last timestamp of a member's train.log (Hydra's job log)."""
    stamps = [dt.datetime.strptime(s, "%Y-%m-%d %H:%M:%S,%f") for s in LOG_TIME.findall(log)]
    return stamps[0], stamps[-1]


@pytest.mark.slow
def test_the_readme_sweep_three_at_a_time_shares_one_cache_and_one_reference(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep_dir, cache_root = tmp_path / "sweep", tmp_path / "cache"
    cmd = [sys.executable, "train.py", "-m", *SMALL, f"loader.cache_root={cache_root}",
           "loader.limit_rows={train:8000,val:2000,test:2000}",
           "phases.pretrain_epochs=1", "phases.compress_epochs=1", "phases.finetune_epochs=1",
           "reference.dir=${loader.cache_root}/dense",  # as the experiments set it
           f"mode={','.join(MODES)}", f"budget.flops={','.join(BUDGETS)}",
           "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20",
           f"hydra.sweeper.max_batch_size={AT_A_TIME}", f"hydra.sweep.dir={sweep_dir}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - start
    print(f"\n{len(MODES) * len(BUDGETS)} members, {AT_A_TIME} at a time, OMP_NUM_THREADS=1: {wall:.0f} s wall")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (sweep_dir / ".submitit").is_dir()  # the members ran as submitit jobs, each in its own process

    # Every member finished and none of the summaries is lost: one per (mode, budget), nothing failed.
    members = sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name[0].isdigit()),
                     key=lambda p: int(p.name.split("-", 1)[0]))
    assert len(members) == len(MODES) * len(BUDGETS), [m.name for m in members]
    assert not list(sweep_dir.glob("*/failed.json"))
    summaries = [read_summary(m) for m in members]
    assert sorted((s["mode"], s["budget"]["flops"]) for s in summaries) == sorted(
        (mode, float(b)) for mode in MODES for b in BUDGETS)
    assert all(s["budget_met"] for s in summaries)

    # AT_A_TIME members at a time: a batch starts once the previous one is done, and all of a batch ran at once,
    # checked on the first batch, whose members run longest (building the cache and the reference, or waiting for
    # them); in a later one a member on a loaded machine may finish before the last one has started.
    spans = [_span((m / "train.log").read_text()) for m in members]
    batches = [spans[i:i + AT_A_TIME] for i in range(0, len(spans), AT_A_TIME)]
    for previous, batch in zip(batches, batches[1:]):
        assert min(first for first, _ in batch) >= max(last for _, last in previous)
    assert max(first for first, _ in batches[0]) < min(last for _, last in batches[0])

    logs = "".join((m / "train.log").read_text() for m in members)
    # One cache, built once: one final directory, no partial build or lock file left, one build in all the logs.
    built = sorted(p.name for p in cache_root.iterdir() if p.name != "dense")
    assert len(built) == 1 and built[0].startswith("synthetic-"), built
    assert logs.count("built cache ") == 1 and "this build was discarded" not in logs

    # One dense reference key; its dense run trained once (to 3 epochs, by a joint member of the first batch), the
    # 2-epoch control magnitude needs trained once; the other members read them.
    keys = [p for p in (cache_root / "dense").iterdir() if p.is_dir()]
    assert len(keys) == 1
    record = json.loads((keys[0] / "reference.json").read_text())
    assert record["epochs_trained"] == 3 and sorted(record["same_epochs"]) == ["2", "3"]
    assert logs.count(": training it in ") == 1 and logs.count(": training its 2-epoch control") == 1
    assert logs.count(f"dense reference {keys[0].name}: reusing") == len(members) - 2
    assert {s["pretrain"]["pretrained"] for s in summaries} == {record["pretrain_checkpoint"]}
    assert len({s["dense_test_auc"] for s in summaries}) == 1  # one pretrain point for all nine
    for s in summaries:
        T = TOTAL[s["mode"]]
        assert s["dense_same_epochs"] == T
        assert s["dense_same_epochs_test_auc"] == record["same_epochs"][str(T)]["test_auc"]

    # The report over the sweep has every member: a row per (mode, budget).
    from umec_lightning.report import build_report

    report = build_report(sweep_dir)
    assert len(report["rows"]) == len(MODES) * len(BUDGETS)
