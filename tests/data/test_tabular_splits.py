"""TabularCSV: validation carved from train, per-file headers, null tokens, zero-row splits."""

import json

import numpy as np
import pytest

from umec_lightning.data import CTRDataModule, DataError, SyntheticCriteo, TabularCSV, build_cache, load_meta
from umec_lightning.data.cache import cache_dir_for

HEADER = "clicked,age,country"


def _csv(path, rows, header=True):
    lines = ([HEADER] if header else []) + [",".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _rows(n, offset=0):
    """n rows whose country is unique per row (c<i>), so a row can be found in the cache."""
    return [(i % 2, i % 50, f"c{offset + i}") for i in range(n)]


def _src(path, **kw):
    kw = {"label": "clicked", "dense": ["age"], "categorical": ["country"], "progress": False, **kw}
    return TabularCSV(path, **kw)


def _arrays(cache, split):
    return (np.load(cache / f"{split}_label.npy"), np.load(cache / f"{split}_dense.npy"),
            np.load(cache / f"{split}_sparse.npy"))


# --- validation carved from train -------------------------------------------------------------------


def test_val_carved_by_line_order(tmp_path, caplog):
    tr = _csv(tmp_path / "train.csv", _rows(20))
    te = _csv(tmp_path / "test.csv", _rows(5, offset=100))
    with caplog.at_level("WARNING"):
        cache = build_cache(_src({"train": str(tr), "test": str(te)}, val_fraction=0.2), tmp_path / "c")
    meta = load_meta(cache)
    assert meta.rows == {"train": 16, "val": 4, "test": 5}
    assert "carved 4 of the 20 rows" in caplog.text and "data.val_fraction=0.2" in caplog.text
    label, dense, sparse = _arrays(cache, "val")
    assert label.tolist() == [r[0] for r in _rows(20)[16:]]  # the last 4 lines, in order
    np.testing.assert_allclose(dense[:, 0], np.log1p([r[1] for r in _rows(20)[16:]]), rtol=1e-6)
    # the vocabulary is built on the train rows only: the carved rows' countries are unseen -> id 0
    assert meta.table_sizes == [1 + 16] and sparse[:, 0].tolist() == [0, 0, 0, 0]
    assert _arrays(cache, "train")[2][:, 0].min() >= 1


def test_val_carved_by_seeded_shuffle(tmp_path):
    tr = _csv(tmp_path / "train.csv", _rows(400))
    te = _csv(tmp_path / "test.csv", _rows(5, offset=1000))
    paths = {"train": str(tr), "test": str(te)}
    a = build_cache(_src(paths, val_fraction=0.25, val_split="shuffle", seed=1), tmp_path / "c")
    rows = load_meta(a).rows
    assert rows["train"] + rows["val"] == 400 and 60 < rows["val"] < 140
    val_dense = _arrays(a, "val")[1][:, 0]
    order_val = np.log1p([r[1] for r in _rows(400)[400 - rows["val"]:]]).astype(np.float32)
    assert not np.array_equal(val_dense, order_val)  # not simply the last lines
    # deterministic per seed, another seed carves other rows
    again = _src(paths, val_fraction=0.25, val_split="shuffle", seed=1, name="again")
    np.testing.assert_array_equal(_arrays(build_cache(again, tmp_path / "c"), "val")[1], _arrays(a, "val")[1])
    other = build_cache(_src(paths, val_fraction=0.25, val_split="shuffle", seed=2), tmp_path / "c")
    assert other != a
    assert not np.array_equal(_arrays(other, "val")[1], _arrays(a, "val")[1])
    # every train line is in exactly one of train/val
    labels = np.concatenate([_arrays(a, "train")[0], _arrays(a, "val")[0]])
    assert labels.sum() == sum(r[0] for r in _rows(400))


def test_carve_is_in_the_fingerprint(tmp_path):
    tr = _csv(tmp_path / "train.csv", _rows(20))
    te = _csv(tmp_path / "test.csv", _rows(5, offset=100))
    va = _csv(tmp_path / "val.csv", _rows(5, offset=200))
    paths = {"train": str(tr), "test": str(te)}
    base = _src(paths, val_fraction=0.1).fingerprint()
    assert base != _src(paths, val_fraction=0.2).fingerprint()
    assert base != _src(paths, val_fraction=0.1, val_split="shuffle").fingerprint()
    assert base == _src(paths, val_fraction=0.1, seed=5).fingerprint()  # seed matters for shuffle only
    shuffled = _src(paths, val_split="shuffle").fingerprint()
    assert shuffled != _src(paths, val_split="shuffle", seed=5).fingerprint()
    with_val = {**paths, "val": str(va)}  # with a val file nothing is carved: the keys do not matter
    assert _src(with_val, val_fraction=0.1).fingerprint() == _src(with_val, val_fraction=0.3).fingerprint()
    a = build_cache(_src(paths, val_fraction=0.1), tmp_path / "c")
    b = build_cache(_src(paths, val_fraction=0.2), tmp_path / "c")
    assert a != b and load_meta(a).rows["val"] == 2 and load_meta(b).rows["val"] == 4


def test_zero_row_splits_are_errors_naming_the_key(tmp_path):
    tr = _csv(tmp_path / "train.csv", _rows(4))
    te = _csv(tmp_path / "test.csv", _rows(3, offset=100))
    paths = {"train": str(tr), "test": str(te)}
    with pytest.raises(DataError, match=r"data\.val_fraction=0\.1 .*carved 0 validation rows"):
        build_cache(_src(paths), tmp_path / "c")  # round(4 * 0.1) = 0
    with pytest.raises(DataError, match=r"no training rows left after data\.val_fraction=0\.9 .*data\.path\.train"):
        build_cache(_src({"train": str(_csv(tmp_path / "one.csv", _rows(1))), "test": str(te)},
                         val_fraction=0.9), tmp_path / "c")
    with pytest.raises(DataError, match=r"data\.path: no test file \(data\.path\.test\)"):
        build_cache(_src({"train": str(_csv(tmp_path / "big.csv", _rows(20)))}), tmp_path / "c")
    with pytest.raises(DataError, match=r"0 test rows .*data\.split"):
        build_cache(_src(str(tr), split=[0.5, 0.5, 0.0]), tmp_path / "c")
    for bad in (0, 1.0, -0.1):
        with pytest.raises(DataError, match="data.val_fraction"):
            _src(paths, val_fraction=bad)
    with pytest.raises(DataError, match="data.val_split"):
        _src(paths, val_split="random")
    assert not [p for p in (tmp_path / "c").iterdir()]  # no cache, no partial build left behind


def test_datamodule_refuses_a_cache_with_an_empty_split(tmp_path):
    synth = SyntheticCriteo(name="tiny", rows={"train": 300, "val": 50, "test": 50}, seed=1,
                            cardinalities=[5] * 26)
    cache = build_cache(synth, tmp_path)
    meta = json.loads((cache / "meta.json").read_text())
    meta["rows"]["val"] = 0  # as an old build of a train/test-only dataset left it
    (cache / "meta.json").write_text(json.dumps(meta))
    assert cache_dir_for(synth, tmp_path) == cache
    with pytest.raises(DataError, match=r"split\(s\) val have 0 rows"):
        CTRDataModule(synth, cache_root=str(tmp_path)).setup()


# --- headers per file -------------------------------------------------------------------------------


def test_header_per_file_keeps_the_first_row_of_a_headless_file(tmp_path):
    tr = _csv(tmp_path / "train.csv", _rows(10))
    te = _csv(tmp_path / "test.csv", _rows(4, offset=100), header=False)
    va = _csv(tmp_path / "val.csv", _rows(3, offset=200))
    paths = {"train": str(tr), "val": str(va), "test": str(te)}
    src = _src(paths, header={"train": True, "val": True, "test": False})
    cache = build_cache(src, tmp_path / "c")
    assert load_meta(cache).rows == {"train": 10, "val": 3, "test": 4}  # all 4 test lines are rows
    assert _arrays(cache, "test")[0].tolist() == [0, 1, 0, 1]
    # header: true for every file drops test's first row: refused, naming the file, line 1 and the key
    with pytest.raises(DataError) as e:
        build_cache(_src(paths, header=True), tmp_path / "c")
    msg = str(e.value)
    assert msg.startswith(f"{te}:1: data.header") and "data.header.test: false" in msg and "\n" not in msg


def test_header_line_in_a_file_said_to_have_none(tmp_path):
    tr = _csv(tmp_path / "train.csv", _rows(10))
    te = _csv(tmp_path / "test.csv", _rows(4, offset=100))  # has a header line
    src = _src({"train": str(tr), "test": str(te)}, header={"train": True, "test": False})
    with pytest.raises(DataError, match=rf"{te}:1: line 1 looks like a header .*data\.header\.test: true"):
        build_cache(src, tmp_path / "c")
    # header-less train with names in `columns`, but the file does start with them
    with pytest.raises(DataError, match=rf"{tr}:1: .*header line.*data\.header"):
        build_cache(_src(str(tr), header=False, columns=HEADER.split(",")), tmp_path / "c")
    # a header-less file read with header: true: the hint says so
    headless = _csv(tmp_path / "headless.csv", _rows(10), header=False)  # line 1: 0,0,c0
    with pytest.raises(DataError, match=rf"{headless}:1: duplicate column names.*looks like data.*data\.header"):
        build_cache(_src(str(headless)), tmp_path / "c")
    headless = _csv(tmp_path / "headless.csv", [(1, 5, "fr"), *_rows(10)], header=False)
    with pytest.raises(DataError, match=r"label: no column named 'clicked'.*looks like data.*data\.header"):
        build_cache(_src(str(headless)), tmp_path / "c")


def test_header_mapping_errors(tmp_path):
    tr = _csv(tmp_path / "train.csv", _rows(10))
    te = _csv(tmp_path / "test.csv", _rows(4, offset=100))
    with pytest.raises(DataError, match=r"data\.header: expected one entry per file"):
        _src({"train": str(tr), "test": str(te)}, header={"train": True})
    with pytest.raises(DataError, match=r"data\.header: a per-file mapping needs data\.path"):
        _src(str(tr), header={"train": True})
    with pytest.raises(DataError, match=r"data\.header: expected true or false per file"):
        _src({"train": str(tr), "test": str(te)}, header={"train": True, "test": "no"})


# --- missing values ---------------------------------------------------------------------------------


def _null_file(tmp_path, dense_tail=("1", "2")):
    rows = [("1", "5", "NA"), ("0", "", ""), ("1", "3", "NULL"), ("0", "4", "nan"), ("1", "6", "N/A"),
            ("0", "7", "fr"), ("1", dense_tail[0], "NA"), ("0", dense_tail[1], "fr")]
    return _csv(tmp_path / "n.csv", rows)


def test_only_the_empty_field_is_missing_by_default(tmp_path):
    p = _null_file(tmp_path)
    cache = build_cache(_src(str(p), split=[0.75, 0.125, 0.125]), tmp_path / "c")
    meta = load_meta(cache)
    # train countries: NA, '', NULL, nan, N/A, fr -> six distinct values (Arrow would fold four into '')
    assert meta.table_sizes == [1 + 6]
    ids = _arrays(cache, "train")[2][:, 0].tolist()
    assert len(set(ids)) == 6 and ids[1] == 1  # '' sorts first
    assert _arrays(cache, "val")[2][0, 0] == ids[0]  # 'NA' in val is train's 'NA'
    np.testing.assert_allclose(_arrays(cache, "train")[1][:2, 0], np.log1p([5, 0]), rtol=1e-6)  # '' -> 0


def test_named_null_tokens_are_missing(tmp_path):
    p = _null_file(tmp_path, dense_tail=("NA", "2"))
    with pytest.raises(DataError) as e:
        build_cache(_src(str(p)), tmp_path / "c")
    msg = str(e.value)
    assert msg.startswith(f"{p}:8: age: dense value must be a finite number") and "data.null_values" in msg
    assert msg.endswith("got 'NA'")
    src = _src(str(p), null_values=["NA", "NULL"], split=[0.75, 0.125, 0.125])
    cache = build_cache(src, tmp_path / "c")
    ids = _arrays(cache, "train")[2][:, 0].tolist()
    assert ids[0] == ids[1] == ids[2]  # NA, '' and NULL: all the missing value
    assert load_meta(cache).table_sizes == [1 + 4]  # missing, nan, N/A, fr
    assert _arrays(cache, "val")[1][0, 0] == 0.0  # dense NA -> missing -> 0
    assert src.fingerprint() != _src(str(p), null_values=["NA"], split=[0.75, 0.125, 0.125]).fingerprint()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_non_finite_dense_values_are_bad_lines(tmp_path, value):
    p = _null_file(tmp_path, dense_tail=("1", value))
    with pytest.raises(DataError, match=rf"{p}:9: age: dense value must be a finite number"):
        build_cache(_src(str(p)), tmp_path / "c")
    meta = load_meta(build_cache(_src(str(p), on_bad_line="skip", split=[0.5, 0.25, 0.25]), tmp_path / "c"))
    assert meta.skipped_lines == 1 and sum(meta.rows.values()) == 7


def test_crlf_line_ends(tmp_path):
    tr = _csv(tmp_path / "train.csv", _rows(10))
    te = tmp_path / "test.csv"  # the same rows, written on Windows
    te.write_bytes(_csv(tmp_path / "lf.csv", _rows(10)).read_bytes().replace(b"\n", b"\r\n"))
    va = _csv(tmp_path / "val.csv", _rows(2))
    cache = build_cache(_src({"train": str(tr), "val": str(va), "test": str(te)}), tmp_path / "c")
    train, test = _arrays(cache, "train"), _arrays(cache, "test")
    for x, y in zip(train, test):  # 'c3\r' would be a country unseen in train (id 0)
        np.testing.assert_array_equal(x, y)
    assert test[2].min() >= 1
