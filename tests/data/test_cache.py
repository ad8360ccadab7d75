import json
import os
import shutil
from pathlib import Path

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


# --- concurrent builders ----------------------------------------------------------------------------


class SlowSource:
    """A real source whose write() takes a while and leaves one file per call in ``writes_dir``."""

    def __init__(self, inner, writes_dir, seconds=0.6):
        self.inner, self.writes_dir, self.seconds = inner, writes_dir, seconds
        self.name = inner.name

    def fingerprint(self):
        return self.inner.fingerprint()

    def write(self, out_dir):
        import time

        (self.writes_dir / f"{os.getpid()}-{out_dir.name}").touch()
        fields = self.inner.write(out_dir)
        time.sleep(self.seconds)
        return fields


def _csv_source(path):
    from umec_lightning.data import TabularCSV

    return TabularCSV(str(path), label="clicked", dense=["age"], categorical=["country"], progress=False)


def _build_in_child(csv, root, writes_dir, barrier, out):
    src = SlowSource(_csv_source(csv), writes_dir)
    barrier.wait()
    final = build_cache(src, root)
    arrays_ok = np.load(final / "train_label.npy").shape == (160,)
    out.write_text(json.dumps({"final": str(final), "inode": os.stat(final).st_ino, "ok": arrays_ok}))


def test_two_processes_build_the_same_cache(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # no re-import of torch in the children: fast
    root, writes = tmp_path / "cache", tmp_path / "writes"
    writes.mkdir()
    csv = tmp_path / "d.csv"  # both build the cache of this one file
    csv.write_text("clicked,age,country\n" + "".join(f"{i % 2},{i % 7},c{i % 5}\n" for i in range(200)))
    barrier = ctx.Barrier(2)
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    procs = [
        ctx.Process(target=_build_in_child, args=(csv, root, writes, barrier, outs[i]))
        for i in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    results = [json.loads(o.read_text()) for o in outs]
    final = Path(results[0]["final"])
    assert results[1]["final"] == str(final) and all(r["ok"] for r in results)
    # one build; the other process waited and reused it: the directory was never replaced or deleted
    assert len(list(writes.iterdir())) == 1
    assert results[0]["inode"] == results[1]["inode"] == os.stat(final).st_ino
    assert load_meta(final).rows == {"train": 160, "val": 20, "test": 20}
    assert sorted(p.name for p in root.iterdir()) == [final.name]  # no tmp dirs, no lock file left


def test_install_never_replaces_a_valid_cache(tiny, tmp_path):
    from umec_lightning.data.cache import install_cache

    final = build_cache(tiny, tmp_path / "a")
    fingerprint = tiny.fingerprint()
    inode = os.stat(final).st_ino
    mine = final.with_name(final.name + ".tmp-1-x")
    shutil.copytree(final, mine)
    assert install_cache(mine, final, fingerprint) is False  # another builder was first: keep theirs
    assert os.stat(final).st_ino == inode and not mine.exists()
    assert load_meta(final).fingerprint == fingerprint
    # an invalid final (another fingerprint) is replaced
    shutil.copytree(final, mine)
    meta = json.loads((final / "meta.json").read_text())
    (final / "meta.json").write_text(json.dumps({**meta, "fingerprint": "0" * 64}))
    assert install_cache(mine, final, fingerprint) is True
    assert load_meta(final).fingerprint == fingerprint and not mine.exists()
    assert sorted(p.name for p in final.parent.iterdir()) == [final.name]


def _hold_build_lock_in_child(root, barrier, rounds, out):
    from umec_lightning.data.cache import build_lock

    inside, overlaps, held = root / "inside", 0, 0
    barrier.wait()
    for _ in range(rounds):
        with build_lock(root, "c") as locked:
            held += locked
            try:  # exactly one holder at a time: a second one finds the marker of the first
                os.close(os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                overlaps += 1
                continue
            os.sched_yield()
            inside.unlink()
    out.write_text(json.dumps({"overlaps": overlaps, "held": held}))


def test_the_build_lock_admits_one_holder_at_a_time_and_leaves_no_file(tmp_path):
    """Three processes take the build lock in turns, each lock file removed by its holder before unlocking (so a
    waiter may get the lock on a removed file and must take the new one): never two holders, no file left."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    root = tmp_path / "cache"
    root.mkdir()
    barrier, rounds = ctx.Barrier(3), 15
    outs = [tmp_path / f"out{i}.json" for i in range(3)]
    procs = [ctx.Process(target=_hold_build_lock_in_child, args=(root, barrier, rounds, o)) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    results = [json.loads(o.read_text()) for o in outs]
    assert [r["overlaps"] for r in results] == [0, 0, 0] and [r["held"] for r in results] == [rounds] * 3
    assert list(root.iterdir()) == []
