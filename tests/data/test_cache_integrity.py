"""Nothing stale, nothing corrupt (issue 24): a cache is checked against the content digests recorded when it was
built, and against its data file's content, each time a run opens it; a cache that fails is rebuilt with one log
line, or refused in one line naming the file when it cannot be rebuilt."""

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from umec_lightning.data import CriteoTSV, build_cache, load_meta
from umec_lightning.data.cache import cache_dir_for


@pytest.fixture()
def data_file(sample_path, tmp_path) -> Path:
    """A private copy of the real Criteo sample (10 000 lines), so a test may edit it."""
    p = tmp_path / "train.txt"
    shutil.copyfile(sample_path, p)
    return p


def _source(path) -> CriteoTSV:
    return CriteoTSV(str(path), progress=False)


def _arrays(cache: Path) -> dict[str, np.ndarray]:
    return {p.name: np.load(p) for p in sorted(cache.glob("*.npy"))}


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _reopen(source, root, caplog) -> Path:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="umec_lightning"):
        return build_cache(source, root)


def _assert_rebuilt(cache: Path, reopened: Path, good: dict, caplog, damaged: str) -> None:
    assert reopened == cache
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and damaged in warnings[0] and "rebuil" in warnings[0], warnings
    again = _arrays(cache)
    assert again.keys() == good.keys()
    for name, arr in good.items():
        np.testing.assert_array_equal(again[name], arr, err_msg=name)


def test_truncated_array_is_rebuilt(data_file, tmp_path, caplog):
    source = _source(data_file)
    cache = build_cache(source, tmp_path / "cache")
    good = _arrays(cache)
    target = cache / "train_sparse.npy"
    with open(target, "r+b") as f:  # a copy cut short: the header still promises every row
        f.truncate(target.stat().st_size // 2)
    reopened = _reopen(source, tmp_path / "cache", caplog)
    _assert_rebuilt(cache, reopened, good, caplog, str(target))


def test_random_bytes_in_an_array_are_detected(data_file, tmp_path, caplog):
    source = _source(data_file)
    cache = build_cache(source, tmp_path / "cache")
    good = _arrays(cache)
    target = cache / "train_sparse.npy"
    size = target.stat().st_size
    with open(target, "r+b") as f:  # same size: only the content tells
        f.seek(size // 2)
        f.write(np.random.default_rng(0).bytes(4096))
    reopened = _reopen(source, tmp_path / "cache", caplog)
    _assert_rebuilt(cache, reopened, good, caplog, str(target))


def test_labels_flipped_in_place_with_the_mtime_restored_are_detected(data_file, tmp_path, caplog):
    source = _source(data_file)
    cache = build_cache(source, tmp_path / "cache")
    good = _arrays(cache)
    target = cache / "test_label.npy"
    st = target.stat()
    labels = np.load(target, mmap_mode="r+")
    labels[:] = 1 - labels  # the tester's flip: test AUC 0.472 instead of 0.578, without a word
    labels.flush()
    del labels
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert target.stat().st_size == st.st_size
    reopened = _reopen(source, tmp_path / "cache", caplog)
    _assert_rebuilt(cache, reopened, good, caplog, str(target))


def test_data_file_edited_in_place_with_size_and_mtime_kept_is_stale(data_file, tmp_path, caplog):
    source = _source(data_file)
    root = tmp_path / "cache"
    cache = build_cache(source, root)
    labels_before = np.load(cache / "test_label.npy")
    # Line 9001 lies in the test half of the last "day": flip its label, keep the size and the mtime.
    raw = bytearray(data_file.read_bytes())
    start = [i for i, b in enumerate(raw) if b == 10][8999] + 1
    assert raw[start] in b"01"
    raw[start] = ord("1") if raw[start] == ord("0") else ord("0")
    st = data_file.stat()
    with open(data_file, "r+b") as f:
        f.write(raw)
    os.utime(data_file, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (data_file.stat().st_size, data_file.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert cache_dir_for(_source(data_file), root) == cache  # path, size and mtime alone cannot tell
    reopened = _reopen(_source(data_file), root, caplog)
    assert reopened == cache
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and str(data_file) in warnings[0] and "rebuil" in warnings[0], warnings
    labels_after = np.load(cache / "test_label.npy")
    assert abs(int(labels_after.sum()) - int(labels_before.sum())) == 1  # the edit is in the cache now


def test_a_cache_without_digests_is_rebuilt(data_file, tmp_path, caplog):
    source = _source(data_file)
    cache = build_cache(source, tmp_path / "cache")
    meta = json.loads((cache / "meta.json").read_text())
    meta.pop("integrity", None)  # a cache as an earlier version wrote it: nothing to check it against
    (cache / "meta.json").write_text(json.dumps(meta))
    reopened = _reopen(source, tmp_path / "cache", caplog)
    assert reopened == cache and len(_warnings(caplog)) == 1
    assert load_meta(cache).integrity["arrays"]
    # The rebuilt cache is intact: the next run reuses it, silently, without writing to it.
    inode, stamp = os.stat(cache).st_ino, (cache / "meta.json").stat().st_mtime_ns
    assert _reopen(source, tmp_path / "cache", caplog) == cache and _warnings(caplog) == []
    assert (os.stat(cache).st_ino, (cache / "meta.json").stat().st_mtime_ns) == (inode, stamp)


# --- a cache root this process cannot write (item 5, and a damaged cache that cannot be rebuilt) ------------------


def _as_unprivileged(fn, *args) -> str:
    """Run ``fn(*args)`` in a forked child that cannot write where the mode bits forbid it (as root: as `nobody`);
    return what it raised (``type: message``) or "ok"."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    reader, writer = ctx.Pipe(duplex=False)

    def child():
        if os.geteuid() == 0:
            os.setgid(65534)
            os.setuid(65534)
        try:
            fn(*args)
            writer.send("ok")
        except BaseException as e:  # noqa: BLE001 (reported to the parent, which asserts on it)
            writer.send(f"{type(e).__name__}: {e}")

    p = ctx.Process(target=child)
    p.start()
    p.join(60)
    assert p.exitcode == 0
    return reader.recv()


@pytest.fixture()
def shared_dir(sample_path):
    """A directory every user may read (pytest's tmp dirs are private to their owner)."""
    d = Path(tempfile.mkdtemp(prefix="umec-ro-"))
    os.chmod(d, 0o755)
    data = d / "train.txt"
    shutil.copyfile(sample_path, data)
    os.chmod(data, 0o644)
    yield d
    for p in d.rglob("*"):
        if p.is_dir():
            os.chmod(p, 0o755)
    shutil.rmtree(d)


def _build(path, root):
    build_cache(_source(path), root)


def test_read_only_cache_root_is_one_line_naming_the_path_and_the_key(shared_dir):
    root = shared_dir / "cache"
    root.mkdir(mode=0o555)
    os.chmod(root, 0o555)
    got = _as_unprivileged(_build, shared_dir / "train.txt", root)
    assert got.startswith("DataError: ") and "\n" not in got, got
    assert str(root) in got and "loader.cache_root" in got
    # A valid cache there (a shared, read-only cache) is used as it is: opening it writes nothing.
    os.chmod(root, 0o755)
    build_cache(_source(shared_dir / "train.txt"), root)
    for p in [root, *root.rglob("*")]:
        os.chmod(p, 0o555 if p.is_dir() else 0o444)
    assert _as_unprivileged(_build, shared_dir / "train.txt", root) == "ok"


def test_a_damaged_cache_that_cannot_be_rebuilt_is_refused_naming_the_file(shared_dir):
    root = shared_dir / "cache"
    cache = build_cache(_source(shared_dir / "train.txt"), root)
    target = cache / "val_label.npy"
    labels = np.load(target, mmap_mode="r+")
    labels[:] = 1 - labels
    labels.flush()
    del labels
    for p in [root, *root.rglob("*")]:
        os.chmod(p, 0o555 if p.is_dir() else 0o444)
    got = _as_unprivileged(_build, shared_dir / "train.txt", root)
    assert got.startswith("DataError: ") and "\n" not in got, got
    assert str(target) in got and "loader.cache_root" in got


# --- concurrency: a damaged cache found by two processes at once is rebuilt once ---------------------------------


def _rebuild_in_child(csv, root, writes_dir, barrier, out):
    from tests.data.test_cache import SlowSource, _csv_source

    src = SlowSource(_csv_source(csv), writes_dir)
    barrier.wait()
    final = build_cache(src, root)
    out.write_text(json.dumps({"final": str(final), "labels": np.load(final / "train_label.npy").tolist()}))


def test_two_processes_finding_a_damaged_cache_rebuild_it_once(tmp_path):
    import multiprocessing as mp

    from tests.data.test_cache import _csv_source

    root, writes = tmp_path / "cache", tmp_path / "writes"
    writes.mkdir()
    csv = tmp_path / "d.csv"
    csv.write_text("clicked,age,country\n" + "".join(f"{i % 2},{i % 7},c{i % 5}\n" for i in range(200)))
    cache = build_cache(_csv_source(csv), root)
    good = np.load(cache / "train_label.npy").tolist()
    labels = np.load(cache / "train_label.npy", mmap_mode="r+")
    labels[:] = 1 - labels
    labels.flush()
    del labels
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(2)
    outs = [tmp_path / f"out{i}.json" for i in range(2)]
    procs = [ctx.Process(target=_rebuild_in_child, args=(csv, root, writes, barrier, o)) for o in outs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    results = [json.loads(o.read_text()) for o in outs]
    assert all(r["final"] == str(cache) and r["labels"] == good for r in results)
    assert len(list(writes.iterdir())) == 1  # one rebuilt it, the other waited for it and verified it
    assert sorted(p.name for p in root.iterdir()) == [cache.name]  # nothing left aside, no lock file
