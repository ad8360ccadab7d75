import math

import numpy as np
import pytest

from tests.data.common import SMALL_CARDS
from umec_lightning.data import CriteoTSV, DataError, SyntheticCriteo, build_cache, load_meta
from umec_lightning.data.criteo import kaggle_day_sizes
from umec_lightning.data.text import hex_column


def _python_parse(path):
    """Slow per-line reference parse of a Criteo TSV (test oracle only)."""
    labels, dense, raw = [], [], []
    for line in path.read_text().splitlines():
        f = line.split("\t")
        labels.append(int(f[0]))
        dense.append([math.log1p(max(int(x), 0)) if x else 0.0 for x in f[1:14]])
        raw.append([int(x, 16) if x else 0 for x in f[14:40]])
    return np.array(labels), np.array(dense), np.array(raw, dtype=np.int64)


def _load(cache, split):
    return (
        np.load(cache / f"{split}_label.npy"),
        np.load(cache / f"{split}_dense.npy"),
        np.load(cache / f"{split}_sparse.npy"),
    )


def _source(path, **kw):
    return CriteoTSV(str(path), progress=False, **kw)


def test_kaggle_day_sizes():
    sizes = kaggle_day_sizes(45_840_617)
    assert sizes == [6_548_660] * 4 + [6_548_659] * 3
    assert kaggle_day_sizes(10_000) == [1429] * 4 + [1428] * 3


@pytest.fixture(scope="module")
def sample_cache(sample_path, tmp_path_factory):
    return build_cache(_source(sample_path, name="criteo_sample"), tmp_path_factory.mktemp("c"))


def test_sample_splits_and_labels(sample_cache):
    meta = load_meta(sample_cache)
    # 10,000 lines in 7 days: 4 x 1429 + 3 x 1428; train = 6 days, last day 1428 -> test 714 | val 714.
    assert meta.rows == {"train": 8572, "test": 714, "val": 714}
    assert meta.table_sizes[8] == 1 + 3  # C9 has 3 distinct values in these lines
    labels = np.concatenate([np.load(sample_cache / f"{s}_label.npy") for s in ("train", "test", "val")])
    assert labels.dtype == np.uint8 and len(labels) == 10_000
    assert labels.sum() == 2182  # real label rate of the sample: 0.2182
    assert meta.label_rate["train"] == pytest.approx(1857 / 8572)


def test_sample_matches_reference_parse(sample_path, sample_cache):
    ref_label, ref_dense, ref_raw = _python_parse(sample_path)
    label, dense, sparse = (
        np.concatenate(x) for x in zip(*(_load(sample_cache, s) for s in ("train", "test", "val")))
    )
    assert dense.dtype == np.float32 and sparse.dtype == np.int32
    np.testing.assert_array_equal(label, ref_label)
    np.testing.assert_allclose(dense, ref_dense, rtol=1e-6)
    n_train = 8572
    for j in range(26):
        train_vals = np.unique(ref_raw[:n_train, j])
        expect = np.searchsorted(train_vals, ref_raw[:, j]) + 1  # sorted raw order, 1-based
        seen = np.isin(ref_raw[:, j], train_vals)
        np.testing.assert_array_equal(sparse[:, j], np.where(seen, expect, 0))


def test_sample_first_line_by_hand(sample_cache):
    # line 1: 0 | 1 1 5 0 1382 4 15 2 181 1 2 <empty> 2 | 68fd1e64 ... C22 empty
    label, dense, sparse = _load(sample_cache, "train")
    assert label[0] == 0
    np.testing.assert_allclose(dense[0], np.log1p([1, 1, 5, 0, 1382, 4, 15, 2, 181, 1, 2, 0, 2]), rtol=1e-6)
    assert dense[0, 11] == 0.0  # I12 empty -> 0
    assert sparse[0, 21] == 1  # C22 empty -> raw 0, the smallest value -> id 1
    assert sparse[0, 0] == sparse[1, 0]  # lines 1 and 2 share C1 = 68fd1e64
    assert sparse[0, 0] != sparse[2, 0]  # line 3 has C1 = 287e684f


def test_hex_without_overflow():
    import pyarrow as pa

    values, bad = hex_column(pa.array([b"ffffffff", b"", b"00000001", b"80000000"], pa.binary()))
    assert bad is None and values.dtype == np.uint32
    assert values.tolist() == [0xFFFFFFFF, 0, 1, 0x80000000]
    values, bad = hex_column(pa.array([b"ff", b"FFFFFFFF", b"123456789", b"zz"], pa.binary()))
    assert values[:2].tolist() == [255, 0xFFFFFFFF] and bad.tolist() == [False, False, True, True]


def test_max_hex_through_pipeline(sample_path, tmp_path):
    lines = sample_path.read_text().splitlines()[:14]
    f = lines[0].split("\t")
    f[14] = "ffffffff"
    lines[0] = "\t".join(f)
    p = tmp_path / "t.tsv"
    p.write_text("\n".join(lines))  # no trailing newline: the last line still counts
    cache = build_cache(_source(p), tmp_path / "c")
    meta = load_meta(cache)
    assert meta.rows == {"train": 12, "test": 1, "val": 1}
    sparse = np.load(cache / "train_sparse.npy")
    assert sparse[0, 0] == meta.table_sizes[0] - 1  # the largest raw value gets the largest id


def test_max_ind_range_and_min_frequency(sample_path, tmp_path):
    full = load_meta(build_cache(_source(sample_path), tmp_path))
    small = load_meta(build_cache(_source(sample_path, max_ind_range=100), tmp_path))
    assert all(s <= 101 for s in small.table_sizes)
    rare = load_meta(build_cache(_source(sample_path, min_frequency=5), tmp_path))
    assert all(r <= f for r, f in zip(rare.table_sizes, full.table_sizes))
    assert rare.table_sizes[2] < full.table_sizes[2] // 2


def _corrupt(sample_path, tmp_path, line_no, field, value, name="bad.tsv"):
    lines = sample_path.read_text().splitlines(keepends=True)[:30]
    f = lines[line_no - 1].rstrip("\n").split("\t")
    if field is None:
        f = f[:-1]  # drop a field
    else:
        f[field] = value
    lines[line_no - 1] = "\t".join(f) + "\n"
    p = tmp_path / name
    p.write_text("".join(lines))
    return p


@pytest.mark.parametrize(
    "line_no, field, value, words",
    [
        (7, None, None, "expected 40 fields, got 39"),
        (11, 20, "xyz12345", "C7"),
        (5, 3, "1.5", "I3"),
        (9, 0, "2", "label"),
        (3, 1, "abc", "I1"),
    ],
)
def test_bad_line_errors(sample_path, tmp_path, line_no, field, value, words):
    p = _corrupt(sample_path, tmp_path, line_no, field, value)
    with pytest.raises(DataError) as e:
        build_cache(_source(p), tmp_path / "c")
    msg = str(e.value)
    assert f"{p}:{line_no}:" in msg and words in msg and "\n" not in msg
    assert not list((tmp_path / "c").glob("*"))  # nothing left behind


def test_first_bad_line_wins(sample_path, tmp_path):
    p = _corrupt(sample_path, tmp_path, 12, None, None)
    lines = p.read_text().splitlines(keepends=True)
    f = lines[4].split("\t")
    f[0] = "7"
    lines[4] = "\t".join(f)
    p.write_text("".join(lines))
    with pytest.raises(DataError, match=rf"{p}:5: label"):
        build_cache(_source(p), tmp_path / "c")


def test_skip_mode_counts(sample_path, tmp_path, caplog):
    lines = sample_path.read_text().splitlines(keepends=True)[:70]
    for i, (field, value) in {3: (None, None), 10: (20, "nothex!!"), 40: (0, "2"), 66: (5, "x")}.items():
        f = lines[i - 1].rstrip("\n").split("\t")
        if field is None:
            f = f[:5]
        else:
            f[field] = value
        lines[i - 1] = "\t".join(f) + "\n"
    lines.insert(20, "\n")  # an empty line is a bad line too (line 21)
    p = tmp_path / "skip.tsv"
    p.write_text("".join(lines))
    with caplog.at_level("WARNING"):
        cache = build_cache(_source(p, on_bad_line="skip"), tmp_path / "c")
    meta = load_meta(cache)
    assert meta.skipped_lines == 5
    assert sum(meta.rows.values()) == 71 - 5
    # bad lines after the insertion: 3, 10, 21, 41, 67. The split is by line number (71 lines ->
    # days of 11,10,10,10,10,10,10): train = lines 1..61 (4 bad), test = 62..66, val = 67..71 (1 bad).
    assert meta.rows == {"train": 57, "test": 5, "val": 4}
    assert "skipped 5 bad lines" in caplog.text


def test_empty_and_missing(tmp_path):
    empty = tmp_path / "empty.tsv"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="empty file"):
        build_cache(_source(empty), tmp_path / "c")
    with pytest.raises(DataError, match="no such file"):
        build_cache(_source(tmp_path / "nope.tsv"), tmp_path / "c")
    with pytest.raises(DataError, match="on_bad_line"):
        CriteoTSV(str(empty), on_bad_line="ignore")


def test_synthetic_round_trip(tmp_path):
    synth = SyntheticCriteo(
        name="rt", rows={"train": 7000, "val": 10, "test": 10}, seed=3, cardinalities=SMALL_CARDS
    )
    p = synth.write_tsv(tmp_path / "synthetic.tsv", 7000)
    text = p.read_text().splitlines()
    assert len(text) == 7000 and all(len(line.split("\t")) == 40 for line in text[:50])
    assert any("\t\t" in line for line in text)  # some empty fields
    cache = build_cache(_source(p, name="rt_tsv"), tmp_path / "c")
    ref = synth.sample(7000)
    label, dense, sparse = (
        np.concatenate(x) for x in zip(*(_load(cache, s) for s in ("train", "test", "val")))
    )
    np.testing.assert_array_equal(label, ref["label"])
    np.testing.assert_array_equal(dense, ref["dense"])
    train = 6000
    for j in range(26):  # ids are the generator's up to a relabelling that is a bijection on train
        a, b = ref["sparse"][:train, j], sparse[:train, j]
        pairs = np.unique(np.stack([a, b], 1), axis=0)
        assert len(pairs) == len(np.unique(a)) == len(np.unique(b))


def test_terabyte_layout(tmp_path):
    synth = SyntheticCriteo(
        name="tb", rows={"train": 3000, "val": 10, "test": 10}, seed=1, cardinalities=SMALL_CARDS
    )
    day_dir = tmp_path / "tb"
    day_dir.mkdir()
    for d in range(3):
        synth.write_tsv(day_dir / f"day_{d}", 1001)
    full = load_meta(build_cache(_source(day_dir, layout="terabyte", num_days=3), tmp_path / "c"))
    assert full.rows == {"train": 2002, "test": 501, "val": 500}
    sub = load_meta(
        build_cache(_source(day_dir, layout="terabyte", num_days=3, label0_subsample=0.5), tmp_path / "c")
    )
    negatives = 2002 * (1 - full.label_rate["train"])
    assert sub.rows["train"] == pytest.approx(2002 - negatives / 2, abs=4 * math.sqrt(negatives))
    assert sub.rows["test"] == 501 and sub.rows["val"] == 500
    (day_dir / "day_2").unlink()
    with pytest.raises(DataError, match="day_2: no such file"):
        _source(day_dir, layout="terabyte", num_days=3).fingerprint()
