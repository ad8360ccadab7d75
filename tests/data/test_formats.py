"""Input formats: gzip read as a stream (Criteo and CSV), other compressed or binary files refused."""

import bz2
import gzip
import lzma
import zipfile

import numpy as np
import pytest

from umec_lightning.data import CriteoTSV, DataError, TabularCSV, build_cache, load_meta
from umec_lightning.data.cache import file_identity
from umec_lightning.data.text import count_lines, first_line, iter_line_blocks

SPLIT_FILES = [f"{s}_{k}.npy" for s in ("train", "val", "test") for k in ("dense", "sparse", "label")]


@pytest.fixture()
def criteo_500(sample_path, tmp_path):
    """The first 500 lines of the shared Criteo sample, plain and gzip'd (written in tmp_path)."""
    with open(sample_path, "rb") as f:
        data = b"".join(next(f) for _ in range(500))
    plain = tmp_path / "head500.tsv"
    plain.write_bytes(data)
    gz = tmp_path / "head500.tsv.gz"
    gz.write_bytes(gzip.compress(data))
    return plain, gz


def _assert_same_arrays(a, b):
    for name in SPLIT_FILES:
        x, y = np.load(a / name), np.load(b / name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x, y, err_msg=name)


def test_gzip_criteo_builds_the_same_cache(criteo_500, tmp_path):
    plain, gz = criteo_500
    a = build_cache(CriteoTSV(str(plain), name="plain", progress=False), tmp_path / "c")
    b = build_cache(CriteoTSV(str(gz), name="gz", progress=False, block_bytes=1 << 14), tmp_path / "c")
    _assert_same_arrays(a, b)
    meta_a, meta_b = load_meta(a), load_meta(b)
    assert meta_b.rows == meta_a.rows == {"train": 429, "test": 36, "val": 35}  # days 3 x 72 + 4 x 71
    assert meta_b.table_sizes == meta_a.table_sizes
    # the fingerprint is of the file as stored: the compressed bytes
    assert file_identity(gz)["size"] == gz.stat().st_size < plain.stat().st_size


def test_gzip_is_streamed_in_blocks(criteo_500):
    plain, gz = criteo_500
    assert count_lines(gz) == count_lines(plain) == 500
    assert first_line(gz) == plain.read_text().split("\n", 1)[0]
    blocks = list(iter_line_blocks(gz, block_bytes=4096, progress=False))
    longest = max(len(line) for line in plain.read_bytes().split(b"\n"))
    assert len(blocks) > 20 and all(len(b) <= 4096 + longest + 1 for b, _ in blocks)  # never the whole file
    assert b"".join(b for b, _ in blocks) == plain.read_bytes()
    assert [line0 for _, line0 in blocks][:2] == [0, blocks[0][0].count(b"\n")]


def test_gzip_terabyte_days(sample_path, tmp_path):
    lines = sample_path.read_bytes().split(b"\n")
    days = tmp_path / "tb"
    days.mkdir()
    for d in range(3):
        (days / f"day_{d}.gz").write_bytes(gzip.compress(b"\n".join(lines[d * 100 : (d + 1) * 100]) + b"\n"))
    meta = load_meta(build_cache(CriteoTSV(str(days), layout="terabyte", num_days=3, progress=False), tmp_path / "c"))
    assert meta.rows == {"train": 200, "test": 50, "val": 50}


def test_gzip_csv_with_header_and_bom(tmp_path):
    text = "\ufeffclicked,age,country\n" + "".join(f"{i % 2},{i},c{i % 3}\n" for i in range(20))
    plain = tmp_path / "a.csv"
    plain.write_text(text.replace("\ufeff", ""))
    gz = tmp_path / "b.csv.gz"
    gz.write_bytes(gzip.compress(text.encode("utf-8")))  # with a UTF-8 byte order mark
    kw = {"label": "clicked", "dense": ["age"], "categorical": ["country"], "progress": False}
    a = build_cache(TabularCSV(str(plain), name="a", **kw), tmp_path / "c")
    b = build_cache(TabularCSV(str(gz), name="b", **kw), tmp_path / "c")
    _assert_same_arrays(a, b)


def _zip(path):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("train.csv", "a,b\n1,2\n")


def _parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": [1, 2]}), path)


@pytest.mark.parametrize(
    "fmt, write",
    [
        ("bzip2", lambda p: p.write_bytes(bz2.compress(b"0\t1\t2\n" * 50))),
        ("xz", lambda p: p.write_bytes(lzma.compress(b"0\t1\t2\n" * 50))),
        ("zstd", lambda p: p.write_bytes(b"\x28\xb5\x2f\xfd" + b"\x00" * 20)),  # a zstd frame header
        ("zip", _zip),
        ("parquet", _parquet),
        ("binary data (a NUL byte at offset 6)", lambda p: p.write_bytes(b"0\t1\t2\n\x00\x00junk\n")),
        ("UTF-16 text", lambda p: p.write_bytes("label,a\n1,2\n".encode("utf-16"))),
    ],
)
def test_other_formats_are_refused_by_name(tmp_path, fmt, write):
    p = tmp_path / "data.txt"  # the name says nothing: detected from the bytes
    write(p)
    for src in (CriteoTSV(str(p), progress=False), TabularCSV(str(p), label=0, dense=[1], progress=False)):
        with pytest.raises(DataError) as e:
            build_cache(src, tmp_path / "c")
        msg = str(e.value)
        assert msg.startswith(f"{p}: {fmt}") and "\n" not in msg
        assert "expected 40 fields" not in msg
    assert not (tmp_path / "c").exists()  # refused before anything is written


def test_gzip_of_binary_and_truncated_gzip(criteo_500, tmp_path):
    plain, gz = criteo_500
    tar_like = tmp_path / "x.tsv.gz"
    tar_like.write_bytes(gzip.compress(b"name\x00\x00\x00" + b"\x00" * 100))
    with pytest.raises(DataError, match=rf"{tar_like}: binary data .*inside the gzip data"):
        CriteoTSV(str(tar_like)).fingerprint()
    double = tmp_path / "double.tsv.gz"
    double.write_bytes(gzip.compress(gz.read_bytes()))
    with pytest.raises(DataError, match=rf"{double}: gzip data inside the gzip data"):
        CriteoTSV(str(double)).fingerprint()
    cut = tmp_path / "cut.tsv.gz"
    cut.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])  # an interrupted download
    with pytest.raises(DataError, match=rf"{cut}: corrupt or truncated gzip data"):
        build_cache(CriteoTSV(str(cut), progress=False), tmp_path / "c")
