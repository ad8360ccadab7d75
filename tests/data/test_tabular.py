import numpy as np
import pytest

from umec_lightning.data import DataError, TabularCSV, build_cache, load_meta

ROWS = [
    ("1", "25", "10.5", "fr", "mobile"),
    ("0", "", "3", "de", "desktop"),
    ("0", "40", "-2", "fr", ""),
    ("1", "31", "7", "us", "mobile"),
    ("0", "22", "0", "fr", "tablet"),
    ("1", "50", "1", "de", "mobile"),
    ("0", "19", "2", "it", "mobile"),
    ("0", "33", "8", "fr", "desktop"),
    ("1", "27", "4", "us", "desktop"),
    ("0", "45", "5", "xx", "watch"),
]


def _write(path, header=True, delimiter=",", rows=ROWS):
    lines = [delimiter.join(("clicked", "age", "price", "country", "device"))] if header else []
    lines += [delimiter.join(r) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_with_header(tmp_path):
    p = _write(tmp_path / "a.csv")
    src = TabularCSV(
        str(p),
        label="clicked",
        dense=["age", "price"],
        categorical=["country", "device"],
        split=[0.8, 0.1, 0.1],
        progress=False,
    )
    cache = build_cache(src, tmp_path / "c")
    meta = load_meta(cache)
    assert meta.rows == {"train": 8, "val": 1, "test": 1}
    assert meta.dense_names == ["age", "price"] and meta.sparse_names == ["country", "device"]
    assert meta.table_sizes == [
        1 + 4,
        1 + 4,
    ]  # train countries: de fr it us; devices: '' desktop mobile tablet
    dense = np.load(cache / "train_dense.npy")
    assert dense.shape == (8, 2)
    np.testing.assert_allclose(dense[:3], np.log1p([[25, 10.5], [0, 3], [40, 0]]), rtol=1e-6)
    sparse = np.load(cache / "train_sparse.npy")
    assert sparse[0, 0] == sparse[2, 0] == 2  # fr (sorted: de, fr, it, us)
    assert sparse[2, 1] == 1  # empty string is a value of its own, the smallest
    assert np.load(cache / "test_sparse.npy")[0].tolist() == [0, 0]  # 'xx', 'watch' unseen in train
    assert np.load(cache / "train_label.npy").tolist() == [1, 0, 0, 1, 0, 1, 0, 0]


def test_without_header_by_index(tmp_path):
    p = _write(tmp_path / "a.tsv", header=False, delimiter="\t")
    src = TabularCSV(
        str(p),
        label=0,
        dense=[1],
        categorical=[3, 4],
        delimiter="\t",
        header=False,
        split=[0.6, 0.2, 0.2],
        dense_transform="none",
        progress=False,
    )
    meta = load_meta(build_cache(src, tmp_path / "c"))
    assert meta.rows == {"train": 6, "val": 2, "test": 2}
    assert meta.dense_names == ["col1"] and meta.sparse_names == ["col3", "col4"]
    dense = np.load(tmp_path / "c" / f"{src.name}-{src.fingerprint()[:12]}" / "train_dense.npy")
    assert dense[:, 0].tolist() == [25, 0, 40, 31, 22, 50]


def test_separate_files(tmp_path):
    tr, te = _write(tmp_path / "train.csv", rows=ROWS[:7]), _write(tmp_path / "test.csv", rows=ROWS[7:])
    src = TabularCSV(
        {"train": str(tr), "test": str(te)},
        label="clicked",
        dense=["age"],
        categorical=["device"],
        progress=False,
    )
    # no val file: the last round(7 * 0.1) = 1 train line becomes validation (val_fraction default 0.1)
    assert load_meta(build_cache(src, tmp_path / "c")).rows == {"train": 6, "val": 1, "test": 3}


@pytest.mark.parametrize(
    "row, value, words",
    [
        (3, ("2", "40", "1", "fr", "x"), "label"),
        (5, ("1", "abc", "7", "us", "mobile"), "age"),
        (7, ("0", "19", "it", "mobile"), "expected 5 fields, got 4"),
    ],
)
def test_errors_name_file_and_line(tmp_path, row, value, words):
    rows = list(ROWS)
    rows[row - 2] = value  # line 1 is the header
    p = _write(tmp_path / "bad.csv", rows=rows)
    src = TabularCSV(str(p), label="clicked", dense=["age", "price"], categorical=["country"], progress=False)
    with pytest.raises(DataError, match=rf"{p}:{row}: .*{words}"):
        build_cache(src, tmp_path / "c")
    skip = TabularCSV(
        str(p),
        label="clicked",
        dense=["age", "price"],
        categorical=["country"],
        on_bad_line="skip",
        progress=False,
    )
    meta = load_meta(build_cache(skip, tmp_path / "c"))
    assert meta.skipped_lines == 1 and sum(meta.rows.values()) == 9


def test_config_errors(tmp_path):
    p = _write(tmp_path / "a.csv")
    with pytest.raises(DataError, match="label: no column named 'click'"):
        build_cache(TabularCSV(str(p), label="click", dense=["age"]), tmp_path / "c")
    with pytest.raises(DataError, match="split"):
        TabularCSV(str(p), label="clicked", dense=["age"], split=[0.5, 0.1])
    with pytest.raises(DataError, match="no such file"):
        TabularCSV(str(tmp_path / "nope.csv"), label=0, dense=[1]).fingerprint()
