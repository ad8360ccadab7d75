"""The fast Criteo preprocessing (label/dense typed by Arrow, sort-based counts, a thread pool, a chunked
remap) against the string path every block took before it, on the real sample with unusual and bad
values planted in it: the caches, or the errors, must be identical."""

import json
import random
import time

import numpy as np
import pytest

from umec_lightning.data import DataError, build_cache, criteo
from umec_lightning.data.cache import SortedCounter, VocabCounter, count_sorted
from umec_lightning.data.text import count_byte, iter_line_blocks, map_ordered, transpose_into, worker_pool

# Tokens the typed path must not change the meaning of: spaces (Arrow's int decoder trims them,
# pc.cast does not), hex ints (pc.cast accepts "0x1F", the fallback regex does not), signs, overflow.
WEIRD = {
    "label": ["0", "1", " 0", "01", "2", ""],
    "dense": [" 5", "5 ", "0x1F", "-3", "-", "007", "1.0", "abc", "99999999999", "-12345678", ""],
    "hex": ["ff", "FFFFFFFF", "123456789", "zz", "", "0", "0000000g", "aBcDeF01"],
}


def _plant(sample_path, out, rate, seed, crlf=False, drop=0.0):
    """The sample with a random cell of about ``rate`` of the lines replaced by a WEIRD token and
    about ``drop`` of the lines missing their last field."""
    rng = random.Random(seed)
    lines = []
    for line in sample_path.read_text().splitlines():
        f = line.split("\t")
        if rng.random() < rate:
            k = rng.randrange(40)
            f[k] = rng.choice(WEIRD["label" if k == 0 else "dense" if k < 14 else "hex"])
        if rng.random() < drop:
            f = f[:-1]
        lines.append("\t".join(f))
    out.write_bytes((("\r\n" if crlf else "\n").join(lines) + "\n").encode())
    return out


def _build(path, root, **kw):
    """{file name: bytes} of the cache (meta.json parsed), or the DataError message."""
    try:
        cache = build_cache(criteo.CriteoTSV(str(path), name="t", progress=False, **kw), root)
    except DataError as e:
        return str(e)
    return {
        f.name: json.loads(f.read_text()) if f.suffix == ".json" else f.read_bytes() for f in cache.iterdir()
    }


def _both_paths(monkeypatch, path, tmp_path, **kw):
    """(reference, fast, blocks the typed path took, blocks in all): the reference is the string path
    on one thread with the default remap chunk; the fast run uses two threads and a remap chunk of
    1,000 rows, so that chunk boundaries fall inside every split."""
    typed = []

    def counting(raw, *a, **k):
        block = parse_typed(raw, *a, **k)
        typed.append(block is not None)
        return block

    parse_typed = criteo.parse_block_typed
    monkeypatch.setattr(criteo, "parse_block_typed", counting)
    monkeypatch.setattr(criteo, "FAST_INTS", False)
    ref = _build(path, tmp_path / "ref", threads=1, **kw)
    monkeypatch.setattr(criteo, "FAST_INTS", True)
    monkeypatch.setattr(criteo, "_REMAP_ROWS", 1000)
    fast = _build(path, tmp_path / "fast", threads=2, **kw)
    return ref, fast, sum(typed), len(typed)


@pytest.mark.parametrize(
    "rate, seed, crlf, drop, kw",
    [
        (0.0, 0, False, 0.0, {}),
        (0.0, 0, False, 0.0, {"min_frequency": 3, "max_ind_range": 5000, "block_bytes": 1 << 16}),
        (0.002, 1, False, 0.0, {"on_bad_line": "skip", "block_bytes": 1 << 16}),
        (0.002, 1, False, 0.0, {"block_bytes": 1 << 16}),  # error mode: the same first bad line
        (0.0005, 2, True, 0.0005, {"on_bad_line": "skip", "block_bytes": 100_000, "min_frequency": 2}),
        (0.0, 3, True, 0.0, {"block_bytes": 1 << 16}),
    ],
)
def test_fast_path_matches_string_path(monkeypatch, sample_path, tmp_path, rate, seed, crlf, drop, kw):
    path = _plant(sample_path, tmp_path / "planted.tsv", rate, seed, crlf, drop)
    ref, fast, typed, blocks = _both_paths(monkeypatch, path, tmp_path, **kw)
    assert fast == ref
    assert typed > 0  # the typed path really ran ...
    if rate:
        assert typed < blocks  # ... and blocks with planted values fell back to the string path
    if isinstance(ref, dict):
        assert ref["meta.json"]["rows"]["train"] > 0


def test_hex_int_is_accepted_only_where_the_cast_is(monkeypatch, sample_path, tmp_path):
    """"0x1F" parses (as 31) while every value of its column casts; once another value of the same
    column in the block needs the regex fallback (" 5"), "0x1F" is a bad value. Both paths agree."""
    lines = sample_path.read_text().splitlines()[:200]

    def with_i2(values):
        out = list(lines)
        for i, v in values.items():
            f = out[i].split("\t")
            f[2] = v
            out[i] = "\t".join(f)
        p = tmp_path / f"i2_{len(values)}.tsv"
        p.write_text("\n".join(out) + "\n")
        return p

    ref, fast, typed, _ = _both_paths(monkeypatch, with_i2({2: "0x1F"}), tmp_path / "a")
    assert fast == ref and typed == 1
    dense = np.frombuffer(ref["train_dense.npy"][128:], np.float32).reshape(-1, 13)
    assert dense[2, 1] == np.float32(np.log1p(np.float32(31)))
    ref, fast, typed, _ = _both_paths(monkeypatch, with_i2({2: "0x1F", 4: " 5"}), tmp_path / "b")
    assert fast == ref and typed == 0
    assert ":3: I2: dense value must be an integer, got '0x1F'" in ref


def test_sorted_counter_matches_vocab_counter():
    rng = np.random.default_rng(0)
    sorted_c, vocab_c = SortedCounter(np.uint32), VocabCounter()
    for i in range(14):  # > 2**18 distinct values in all: several merges
        n = 0 if i == 3 else int(rng.integers(1, 60_000))
        v = np.concatenate([rng.integers(0, 2**32, n, dtype=np.uint32), rng.zipf(1.5, n).astype(np.uint32)])
        if n:
            v[:2] = [0, 2**32 - 1]
        vocab_c.add(v)
        if i % 2:
            sorted_c.add(v)
        else:
            sorted_c.add_counts(*count_sorted(v))
    for mf in (0, 1, 2, 5):
        expect = vocab_c.vocabulary(mf).to_numpy(zero_copy_only=False).astype(np.uint32)
        np.testing.assert_array_equal(sorted_c.vocabulary(mf), expect)
    assert len(SortedCounter().vocabulary(2)) == 0


def test_map_ordered_keeps_order_and_raises_in_turn():
    pulled = []

    def items():
        for i in range(20):
            pulled.append(i)
            yield i

    def work(i):
        time.sleep(0.002 * (4 - i % 4))  # later items often finish first
        if i == 11:
            raise ValueError("item 11")
        return i * i

    with worker_pool(3) as pool:
        out = []
        with pytest.raises(ValueError, match="item 11"):
            for r in map_ordered(pool, work, items()):
                assert len(pulled) <= len(out) + 3  # at most 3 (the workers) in flight
                out.append(r)
    assert out == [i * i for i in range(11)]
    with worker_pool(1) as pool:
        assert pool is None and list(map_ordered(pool, work, range(5))) == [0, 1, 4, 9, 16]


def test_count_byte_and_transpose_into():
    rng = np.random.default_rng(1)
    data = rng.integers(8, 12, 100_003, dtype=np.uint8).tobytes()
    for b in (9, 10, 11):
        assert count_byte(data, b, step=4096) == data.count(bytes([b])) == count_byte(data, b)
    src = rng.integers(0, 2**32, (1234, 26), dtype=np.uint32)
    dst = np.empty((26, 1234), np.uint32)
    transpose_into(dst, src, step=100)
    np.testing.assert_array_equal(dst, src.T)


def test_line_blocks_smaller_than_a_line(tmp_path):
    text = b"".join(b"x" * (i % 13) + b"\t%d\n" % i for i in range(300)) + b"last"
    p = tmp_path / "lines.tsv"
    p.write_bytes(text)
    for block_bytes in (5, 64, 1 << 20):
        blocks = list(iter_line_blocks(p, block_bytes, progress=False))
        assert b"".join(b for b, _ in blocks) == text + b"\n"
        assert [line0 for _, line0 in blocks] == [0, *np.cumsum([b.count(b"\n") for b, _ in blocks])[:-1]]
        assert all(b.endswith(b"\n") for b, _ in blocks)


def test_a_plus_signed_dense_value_is_read_as_its_number(sample_path, tmp_path):
    """"+5" matches the number pattern of the string path, so it must convert (it once ended in a raw
    ArrowInvalid naming no file or line)."""
    lines = sample_path.read_text().splitlines()[:300]
    fields = lines[7].split("\t")
    fields[1] = "+5"  # I1 of line 8
    lines[7] = "\t".join(fields)
    path = tmp_path / "plus.tsv"
    path.write_text("\n".join(lines) + "\n")
    cache = build_cache(criteo.CriteoTSV(str(path), name="plus", progress=False), tmp_path / "cache")
    dense = np.concatenate([np.load(cache / f"{split}_dense.npy") for split in ("train", "val", "test")])
    assert np.log1p(np.float32(5)) in dense[:, 0]
