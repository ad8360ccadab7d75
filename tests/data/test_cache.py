import json
import os

import numpy as np
import pytest

from tests.data.common import SMALL_CARDS
from umec_lightning.data import CriteoTSV, DataError, SyntheticCriteo, build_cache, load_meta
from umec_lightning.data.cache import NpyAppender, cache_dir_for


class CountingSource:
    """Wraps a source and counts write() calls; ``fail_after`` makes write() die midway."""

    def __init__(self, inner, fail=False):
        self.inner, self.fail, self.writes = inner, fail, 0
        self.name = inner.name

    def fingerprint(self):
        return self.inner.fingerprint()

    def write(self, out_dir):
        self.writes += 1
        fields = self.inner.write(out_dir)
        if self.fail:
            raise KeyboardInterrupt("killed midway")
        return fields


@pytest.fixture()
def tiny():
    return SyntheticCriteo(
        name="tiny", rows={"train": 2000, "val": 500, "test": 500}, seed=5, cardinalities=SMALL_CARDS
    )


def test_cache_reused(tiny, tmp_path):
    src = CountingSource(tiny)
    first = build_cache(src, tmp_path)
    stamp = (first / "meta.json").stat().st_mtime_ns, (first / "train_dense.npy").stat().st_mtime_ns
    second = build_cache(src, tmp_path)
    assert first == second == cache_dir_for(tiny, tmp_path)
    assert src.writes == 1
    assert (
        (second / "meta.json").stat().st_mtime_ns,
        (second / "train_dense.npy").stat().st_mtime_ns,
    ) == stamp
    assert load_meta(first).fingerprint == tiny.fingerprint()


def test_interrupted_write_is_never_loaded(tiny, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        build_cache(CountingSource(tiny, fail=True), tmp_path)
    assert list(tmp_path.iterdir()) == []  # no final dir, no tmp dir
    # a process killed mid-write leaves a tmp dir behind: it is ignored and cleaned up
    final = cache_dir_for(tiny, tmp_path)
    dead = tmp_path / f"{final.name}.tmp-999999999"
    dead.mkdir()
    (dead / "train_dense.npy").write_bytes(b"partial")
    # and a final dir without meta.json (or with another fingerprint) is never loaded
    final.mkdir()
    (final / "train_dense.npy").write_bytes(b"junk")
    with pytest.raises(DataError):
        load_meta(final)
    src = CountingSource(tiny)
    assert build_cache(src, tmp_path) == final and src.writes == 1
    assert not dead.exists()
    assert np.load(final / "train_dense.npy").shape == (2000, 13)
    meta = json.loads((final / "meta.json").read_text())
    meta["fingerprint"] = "0" * 64
    (final / "meta.json").write_text(json.dumps(meta))
    build_cache(src, tmp_path)
    assert src.writes == 2


def test_fingerprint_change_rebuilds(tiny, tmp_path, sample_path):
    a = build_cache(tiny, tmp_path)
    b = build_cache(
        SyntheticCriteo(
            name="tiny", rows={"train": 2000, "val": 500, "test": 500}, seed=6, cardinalities=SMALL_CARDS
        ),
        tmp_path,
    )
    assert a != b and a.exists() and b.exists()
    assert load_meta(a).fingerprint != load_meta(b).fingerprint
    c1 = CriteoTSV(str(sample_path), min_frequency=1).fingerprint()
    assert c1 != CriteoTSV(str(sample_path), min_frequency=2).fingerprint()
    assert c1 == CriteoTSV(str(sample_path), min_frequency=1, block_bytes=1 << 20).fingerprint()


def test_npy_appender(tmp_path):
    w = NpyAppender(tmp_path / "a.npy", np.float32, 3)
    w.append(np.ones((5, 3)))
    w.append(np.zeros((2, 3)))
    assert w.close() == 7
    arr = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert arr.shape == (7, 3) and arr.dtype == np.float32 and arr[:5].sum() == 15
    w = NpyAppender(tmp_path / "b.npy", np.uint8)
    w.close()
    assert np.load(tmp_path / "b.npy").shape == (0,)
    assert os.path.getsize(tmp_path / "b.npy") == 128
