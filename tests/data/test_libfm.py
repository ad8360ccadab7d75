"""libFM text (the NFM/AFM releases of Frappe and MovieLens-tag): parsing, labels, gzip, bad lines, the shipped
configs, and data=frappe end to end through train.py on a generated file of the release's layout."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from bench.frappe_like import CARD
from bench.frappe_like import main as frappe_like
from umec_lightning.data import DataError, LibFMText, TabularCSV, build_cache, load_meta
from umec_lightning.data.core import SPLITS

ROOT = Path(__file__).resolve().parents[2]

# Two fields, indices global across them (user 0-9, item 10-19), as the releases number them.
TRAIN = """-1 3:1 12:1
1 4:1 12:1
1 3:1 15:1
-1 7:1 12:1
1 4:1 15:1
"""
VAL = "1 4:1 15:1\n-1 9:1 12:1\n"
TEST = "1 3:1 19:1\n-1 7:1 15:1\n"


def _files(tmp_path: Path, train: str = TRAIN, val: str = VAL, test: str = TEST, opener=None) -> dict[str, str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, text in (("train", train), ("val", val), ("test", test)):
        p = tmp_path / f"d.{split}.libfm"
        p.write_bytes(opener(text.encode()) if opener else text.encode())
        paths[split] = str(p)
    return paths


def _arrays(cache: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> (sparse ids, labels) of a built cache."""
    return {s: (np.load(cache / f"{s}_sparse.npy"), np.load(cache / f"{s}_label.npy")) for s in SPLITS}


def _build(tmp_path: Path, paths, **kw):
    cache = build_cache(LibFMText(paths, fields=["user", "item"], progress=False, **kw), tmp_path / "cache")
    return load_meta(cache), _arrays(cache)


def test_fields_by_position_indices_reindexed_per_field_and_pm1_labels(tmp_path):
    meta, arrays = _build(tmp_path, _files(tmp_path))
    assert meta.sparse_names == ["user", "item"] and meta.dense_names == []
    assert meta.rows == {"train": 5, "val": 2, "test": 2}
    assert meta.source["kind"] == "LibFMText"
    # Per field, the train indices sorted: user 3, 4, 7 -> 1, 2, 3; item 12, 15 -> 1, 2; id 0 = unseen in train.
    assert meta.table_sizes == [4, 3]
    sparse, label = arrays["train"]
    assert sparse.tolist() == [[1, 1], [2, 1], [1, 2], [3, 1], [2, 2]]
    assert label.tolist() == [0, 1, 1, 0, 1]  # -1 -> 0
    assert arrays["val"][0].tolist() == [[2, 2], [0, 1]]  # user 9 never in train
    assert arrays["test"][0].tolist() == [[1, 0], [3, 2]]  # item 19 never in train
    assert arrays["test"][1].tolist() == [1, 0]


def test_zero_one_labels_and_min_frequency(tmp_path):
    train = TRAIN.replace("-1 ", "0 ")
    meta, arrays = _build(tmp_path, _files(tmp_path, train=train), min_frequency=2)
    assert arrays["train"][1].tolist() == [0, 1, 1, 0, 1]
    # user 7 is seen once in train: below min_frequency 2, it shares id 0 with the unseen
    assert meta.table_sizes == [3, 3]
    assert arrays["train"][0][:, 0].tolist() == [1, 2, 1, 0, 2]


def test_gzip_blanks_and_crlf_read_like_the_plain_file(tmp_path):
    _, plain = _build(tmp_path / "plain", _files(tmp_path))
    _, zipped = _build(tmp_path / "gz", _files(tmp_path / "gz", opener=gzip.compress))
    messy = TRAIN.replace(" ", "  \t").replace("\n", " \r\n")  # runs of blanks, trailing blanks, CRLF
    _, blanks = _build(tmp_path / "blanks", _files(tmp_path / "blanks", train=messy))
    for split in plain:
        for a, b, c in zip(plain[split], zipped[split], blanks[split]):
            assert a.tolist() == b.tolist() == c.tolist()


@pytest.mark.parametrize("line, message", [
    ("2 3:1 12:1", "label: expected -1, 0 or 1 (libFM's -1/1, or 0/1), got '2'"),
    ("yes 3:1 12:1", "label: expected -1, 0 or 1 (libFM's -1/1, or 0/1), got 'yes'"),
    ("1 3:1", "expected a label and 2 index:value pairs (one per field of data.fields), got 1 pairs"),
    ("1 3:1 12:1 14:1", "got 3 pairs after the label"),
    ("", "got an empty line"),
    ("1 3:1 12:0.5", "item: expected <index>:1, one one-hot index per field, got '12:0.5'"),
    ("1 3:1 x:1", "item: expected <index>:1, one one-hot index per field, got 'x:1'"),
    ("1 3 12:1", "user: expected <index>:1, one one-hot index per field, got '3'"),
])
def test_a_bad_line_is_named_by_file_and_line(tmp_path, line, message):
    lines = TRAIN.splitlines()
    lines.insert(2, line)
    paths = _files(tmp_path, train="\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        _build(tmp_path, paths)
    assert str(err.value).startswith(f"{paths['train']}:3: ")
    assert message in str(err.value)


def test_skip_drops_and_counts_bad_lines(tmp_path):
    train = TRAIN + "2 3:1 12:1\n1 3:1\n1 4:1 12:2\n"
    meta, arrays = _build(tmp_path, _files(tmp_path, train=train), on_bad_line="skip")
    assert meta.skipped_lines == 3 and meta.rows["train"] == 5
    assert arrays["train"][1].tolist() == [0, 1, 1, 0, 1]


@pytest.mark.parametrize("fields", [[], "user", ["user", "user"], ["label", "item"]])
def test_fields_must_name_distinct_columns(tmp_path, fields):
    with pytest.raises(DataError, match="data.fields"):
        LibFMText(_files(tmp_path), fields=fields)


def test_a_missing_file_is_named(tmp_path):
    paths = {**_files(tmp_path), "test": str(tmp_path / "nope.libfm")}
    with pytest.raises(DataError, match="nope.libfm: no such file"):
        _build(tmp_path, paths)


# --- the shipped configs, on files of the release's layout (bench/frappe_like.py) --------------------------------


@pytest.fixture(scope="module")
def frappe_dirs(tmp_path_factory):
    """The same generated rows in both layouts: {'libfm': dir, 'csv': dir}."""
    dirs = {}
    for layout in ("libfm", "csv"):
        d = tmp_path_factory.mktemp(layout)
        frappe_like(["--out", str(d), "--layout", layout, "--rows-train", "6000", "--rows-val", "1500",
                     "--rows-test", "1500"])
        dirs[layout] = d
    return dirs


def _compose(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def test_data_frappe_reads_the_libfm_release_and_frappe_x1_the_bars_csv(frappe_dirs, tmp_path, monkeypatch):
    metas, arrays = {}, {}
    for data, layout, cls in (("frappe", "libfm", LibFMText), ("frappe_x1", "csv", TabularCSV)):
        monkeypatch.setenv("FRAPPE_DIR", str(frappe_dirs[layout]))
        cfg = _compose([f"data={data}"])
        assert cfg.data.name == data
        src = instantiate(cfg.data, progress=False)
        assert type(src) is cls
        cache = build_cache(src, tmp_path)
        metas[data], arrays[data] = load_meta(cache), _arrays(cache)
    assert metas["frappe"].sparse_names == list(CARD) == metas["frappe_x1"].sparse_names
    assert metas["frappe"].rows == {"train": 6000, "val": 1500, "test": 1500} == metas["frappe_x1"].rows
    assert metas["frappe"].table_sizes == metas["frappe_x1"].table_sizes
    # Same labels; per field the ids of one layout map one-to-one onto the other's (both are vocabularies of the
    # same train values, sorted as strings: "950" before "99" in one, "1049" before "999" in the other).
    for split, (sparse, label) in arrays["frappe"].items():
        csv_sparse, csv_label = arrays["frappe_x1"][split]
        assert label.tolist() == csv_label.tolist()
        for j in range(len(CARD)):
            pairs = set(zip(sparse[:, j].tolist(), csv_sparse[:, j].tolist()))
            assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs})


def test_data_frappe_trains_end_to_end_through_train_py(frappe_dirs, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "train.py", "experiment=frappe", "logger=csv", f"loader.cache_root={tmp_path / 'cache'}",
           "phases.pretrain_epochs=3", "loader.batch_size=256", "trainer.enable_progress_bar=false",
           "latency.repeats=3", "latency.batches=[1,256]", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FRAPPE_DIR": str(frappe_dirs["libfm"])}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data"]["name"] == "frappe" and summary["mode"] == "dense"
    assert summary["data"]["rows"] == {"train": 6000, "val": 1500, "test": 1500}
    assert summary["test_auc"] > 0.7 and summary["test_logloss"] < 0.69  # the planted signal is learned
