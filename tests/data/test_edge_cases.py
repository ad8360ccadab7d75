"""Input at the edges (issue 24): one class, a value too long for the reader, non-finite numbers in a JSON file, and a
compression that removed nothing."""

import json
import logging
import math

import pytest

from umec_lightning.data import CTRDataModule, DataError, TabularCSV, build_cache
from umec_lightning.io import write_json


def _strict_loads(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def _csv(path, labels):
    path.write_text("clicked,age,country\n" + "".join(f"{y},{i % 7},c{i % 5}\n" for i, y in enumerate(labels)))
    return path


def _tabular(path) -> TabularCSV:
    return TabularCSV(str(path), label="clicked", dense=["age"], categorical=["country"], progress=False)


def test_a_split_with_one_class_is_refused_before_training(tmp_path):
    data = _csv(tmp_path / "d.csv", [0] * 200)  # the tester's file: every label 0
    dm = CTRDataModule(_tabular(data), cache_root=str(tmp_path / "cache"))
    with pytest.raises(DataError) as err:
        dm.ensure_ready()
    msg = str(err.value)
    assert "\n" not in msg and str(data) in msg
    assert "train" in msg and "160 rows" in msg and "label 0" in msg


def test_limit_rows_that_leave_one_class_are_refused_naming_the_key(tmp_path):
    # Both classes in every split, but the first 10 test rows are all 0.
    labels = [i % 2 for i in range(160)] + [i % 2 for i in range(20)] + [0] * 10 + [1] * 10
    data = _csv(tmp_path / "d.csv", labels)
    dm = CTRDataModule(_tabular(data), cache_root=str(tmp_path / "cache"), limit_rows={"test": 10})
    with pytest.raises(DataError, match=r"loader\.limit_rows\.test=10.*label 0") as err:
        dm.ensure_ready()
    assert "\n" not in str(err.value)


def test_write_json_never_writes_nan_or_infinity(tmp_path, caplog):
    path = tmp_path / "summary.json"
    with caplog.at_level(logging.WARNING, logger="umec_lightning"):
        write_json(path, {"test_auc": float("nan"), "latency": {"ms": [1.5, float("-inf")]}, "ok": 0.5, "n": 3})
    got = _strict_loads(path.read_text())
    assert got == {"test_auc": None, "latency": {"ms": [1.5, None]}, "ok": 0.5, "n": 3}
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert str(path) in warning and "test_auc" in warning and "latency.ms[1]" in warning


LONG = 10 << 20  # the tester's 10 MB value


def _with_long_value(path, sample_lines, line_no):
    fields = sample_lines[line_no - 1].split("\t")
    fields[14] = "a" * LONG  # C1
    sample_lines[line_no - 1] = "\t".join(fields)
    path.write_text("\n".join(sample_lines) + "\n")
    return path


def test_a_huge_value_names_the_file_the_line_and_the_limit(sample_path, tmp_path):
    from umec_lightning.data import CriteoTSV

    lines = sample_path.read_text().splitlines()[:50]
    data = _with_long_value(tmp_path / "train.txt", lines, 3)
    with pytest.raises(DataError) as err:
        build_cache(CriteoTSV(str(data), progress=False), tmp_path / "cache")
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{data}:3:")
    assert f"a line of {len(lines[2])} bytes" in msg  # the edited line, its 10 MB value included
    assert "1 MiB" in msg


def test_a_huge_value_in_a_csv_names_the_file_and_the_line(tmp_path):
    rows = [f"{i % 2},{i % 7},c{i % 5}" for i in range(40)]
    rows[9] = f"1,3,{'x' * LONG}"
    data = tmp_path / "d.csv"
    data.write_text("clicked,age,country\n" + "\n".join(rows) + "\n")
    with pytest.raises(DataError, match=r"d\.csv:11: .*1 MiB"):
        build_cache(_tabular(data), tmp_path / "cache")


def test_group_lasso_that_removes_nothing_does_not_report_a_compression_ratio_of_zero(tmp_path):
    from tests.pipeline.conftest import compose_cfg
    from umec_lightning.run import run

    rows = {"train": 2000, "val": 1000, "test": 1000}
    cfg = compose_cfg(
        [
            "mode=group_lasso",
            "mode.method.lam=0",
            "mode.method.threshold=0",
            "phases.pretrain_epochs=1",
            "phases.compress_epochs=1",
            "phases.finetune_epochs=1",
            *(f"data.rows.{k}={v}" for k, v in rows.items()),
            "export.torchscript=false",
            "export.onnx=false",
        ],
        tmp_path / "cache",
    )
    run(cfg, tmp_path / "run")
    summary = _strict_loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["flops_ratio"] == summary["params_ratio"] == 1.0  # nothing pruned
    assert "compression_ratio" not in summary  # 0.0 read as "compressed to nothing"
    assert summary["reduction"] == {"flops": 0.0, "params": 0.0}
    assert not any(isinstance(v, float) and not math.isfinite(v) for v in summary.values())
