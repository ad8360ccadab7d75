"""The on-disk cache: atomic build, fingerprints, incremental ``.npy`` writers and vocabularies.

A cache directory ``<root>/<name>-<fingerprint[:12]>`` holds, per split s in train/val/test,
``s_dense.npy`` (float32, N x num_dense, log1p already applied), ``s_sparse.npy`` (int32, N x F,
vocabulary ids) and ``s_label.npy`` (uint8, N), plus ``meta.json``, written last. A directory whose
``meta.json`` is missing or carries another fingerprint is never loaded.

Concurrent builders (a sweep, several nodes on a shared disk) are safe: a builder holds an exclusive
``fcntl`` lock on ``<root>/<name>-<fp>.lock`` while it builds, so the others wait and then reuse its
cache; it builds into a unique ``<final>.tmp-<pid>-<token>`` and renames it into place. A valid final
directory is never deleted or replaced: if one appears (a builder without the lock won), the new build
is discarded. Where the file system has no locks, the rename rules alone keep a valid cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from umec_lightning.data.core import SPLITS, CacheMeta, DataError, load_meta

try:
    import fcntl
except ImportError:  # not POSIX: no lock, the rename rules alone
    fcntl = None

log = logging.getLogger(__name__)

# Bump when the layout or the meaning of cached arrays changes: every old cache is then rebuilt.
FORMAT_VERSION = 1

_HEADER_BYTES = 128  # fixed .npy header size, so the final shape can be written after the data


def file_identity(path: str | Path) -> dict:
    """What identifies a source file for the fingerprint: absolute path, size and mtime."""
    p = Path(path).resolve()
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def make_fingerprint(kind: str, options: dict, files: list[dict] | None = None) -> str:
    blob = json.dumps(
        {"format": FORMAT_VERSION, "kind": kind, "options": options, "files": files or []},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_dir_for(source, cache_root: str | Path) -> Path:
    return Path(cache_root) / f"{source.name}-{source.fingerprint()[:12]}"


def _valid_cache(path: Path, fingerprint: str) -> bool:
    try:
        meta = load_meta(path)
    except DataError:
        return False
    if meta.fingerprint != fingerprint:
        return False
    return all((path / f"{s}_{k}.npy").exists() for s in SPLITS for k in ("dense", "sparse", "label"))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (OSError, OverflowError, ValueError):
        return False
    return True


def _tmp_pid(tmp: Path, stem: str) -> int:
    """The pid in ``<stem>.tmp-<pid>[-<token>]``, or -1."""
    try:
        return int(tmp.name[len(stem) + len(".tmp-") :].split("-", 1)[0])
    except ValueError:
        return -1


def _clean_stale_tmp(root: Path, stem: str, locked: bool) -> None:
    """Remove partial builds of ``stem`` left by dead processes. Under the build lock every one is
    stale (a live builder would hold the lock); without it only those whose pid is not alive here."""
    for tmp in root.glob(f"{stem}.tmp-*"):
        pid = _tmp_pid(tmp, stem)
        if locked or pid == os.getpid() or not _pid_alive(pid):
            log.info("removing stale partial cache %s", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def build_lock(root: Path, stem: str) -> Iterator[bool]:
    """Hold an exclusive lock on ``<root>/<stem>.lock``, waiting for another builder; yields whether a
    lock is held (False where the file system has none). The holder removes the lock file when done;
    a waiter that then gets the lock on the removed file notices (inode check) and locks the new one."""
    if fcntl is None:
        yield False
        return
    path = root / f"{stem}.lock"
    while True:
        try:
            f = open(path, "a+b")  # noqa: SIM115 (closed below: that releases the lock)
        except OSError as e:
            log.warning("cannot create the lock file %s (%s): building without a lock", path, e)
            yield False
            return
        locked = _acquire(f, root / stem)
        if not locked:
            f.close()
            yield False
            return
        try:
            same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()  # the lock file was removed (and maybe recreated) while we waited: lock the current one
    try:
        yield True
    finally:
        try:
            path.unlink(missing_ok=True)
        finally:
            f.close()


def _acquire(f, final: Path) -> bool:
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        log.info("another process is building %s: waiting for it", final)
    except OSError as e:  # ENOLCK, EOPNOTSUPP: no locks on this file system
        log.warning("no file lock for %s (%s): building without a lock", final, e)
        return False
    fcntl.flock(f, fcntl.LOCK_EX)
    return True


def install_cache(tmp: Path, final: Path, fingerprint: str) -> bool:
    """Move the complete cache ``tmp`` to ``final``; return whether it was installed.

    A valid ``final`` (another builder was first) is kept and ``tmp`` removed. An invalid one (old
    format, broken, another fingerprint) is renamed aside, then removed; if what was renamed aside
    turns out valid after all (a builder without the lock installed it meanwhile), it goes back.
    """
    for _ in range(5):
        if _valid_cache(final, fingerprint):
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        if final.exists() or final.is_symlink():
            aside = final.with_name(f"{final.name}.tmp-{os.getpid()}-old{secrets.token_hex(4)}")
            try:
                os.replace(final, aside)
            except FileNotFoundError:
                continue
            if _valid_cache(aside, fingerprint):
                try:
                    os.replace(aside, final)
                except OSError:
                    pass  # yet another valid one is in place: this copy is a duplicate
                else:
                    continue
            shutil.rmtree(aside, ignore_errors=True)
        try:
            os.replace(tmp, final)  # fails if a non-empty directory appeared at final meanwhile
            return True
        except OSError:
            continue
    if _valid_cache(final, fingerprint):
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    raise DataError(f"{final}: could not put the built cache in place (kept at {tmp})")


def build_cache(source, cache_root: str | Path) -> Path:
    """Build (or reuse) the cache of ``source`` under ``cache_root`` and return its directory.

    The arrays are written into ``<final>.tmp-<pid>-<token>``; ``meta.json`` is written last and the
    directory is then renamed into place, so an interrupted build never leaves a loadable cache behind.
    Builders of the same cache take turns (see the module docstring): the later ones reuse it.
    """
    root = Path(cache_root)
    fingerprint = source.fingerprint()
    final = root / f"{source.name}-{fingerprint[:12]}"
    if _valid_cache(final, fingerprint):
        log.info("reusing cache %s", final)
        return final
    root.mkdir(parents=True, exist_ok=True)
    with build_lock(root, final.name) as locked:
        if _valid_cache(final, fingerprint):
            log.info("reusing cache %s (built by another process meanwhile)", final)
            return final
        _clean_stale_tmp(root, final.name, locked)
        tmp = root / f"{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            fields = dict(source.write(tmp))
            meta = CacheMeta(fingerprint=fingerprint, name=source.name, **fields)
            staged = tmp / "meta.json.partial"
            staged.write_text(meta.to_json())
            os.replace(staged, tmp / "meta.json")
            installed = install_cache(tmp, final, fingerprint)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if installed:
        log.info("built cache %s (%s)", final, meta.rows)
    else:
        log.info("reusing cache %s (another process finished it first; this build was discarded)", final)
    return final


class NpyAppender:
    """Append rows to a ``.npy`` file whose final length is not known in advance (bounded memory).

    The header has a fixed size and is rewritten with the true shape on ``close()``.
    """

    def __init__(self, path: str | Path, dtype, width: int | None = None):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.width = width
        self.rows = 0
        self._f = open(self.path, "wb")  # noqa: SIM115 (closed by close(), after the last append)
        self._f.write(b"\0" * _HEADER_BYTES)

    def append(self, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        self._f.write(arr.data)
        self.rows += arr.shape[0]

    def close(self) -> int:
        shape = (self.rows,) if self.width is None else (self.rows, self.width)
        self._f.seek(0)
        self._f.write(npy_header(self.dtype, shape))
        self._f.close()
        return self.rows


def npy_header(dtype, shape: tuple) -> bytes:
    """A version-1.0 ``.npy`` header padded to exactly ``_HEADER_BYTES`` bytes."""
    d = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": shape}
    text = repr(d).encode("latin1")
    pad = _HEADER_BYTES - 10 - len(text) - 1
    if pad < 0:
        raise ValueError(f"npy header too long for shape {shape}")
    body = text + b" " * pad + b"\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body


def retype_npy(path: str | Path, dtype) -> None:
    """Rewrite the header of a file written by NpyAppender to a same-itemsize dtype (in-place remap)."""
    arr = np.load(path, mmap_mode="r")
    shape, old = arr.shape, arr.dtype
    del arr
    if np.dtype(dtype).itemsize != old.itemsize:
        raise ValueError("retype_npy needs equal item sizes")
    with open(path, "r+b") as f:
        f.write(npy_header(dtype, shape))


class SplitWriter:
    """The three appenders (dense, sparse, label) of each split, inside a cache tmp dir."""

    def __init__(self, out_dir: Path, num_dense: int, num_sparse: int, sparse_dtype=np.int32):
        self.out_dir = Path(out_dir)
        self.files = {
            s: {
                "dense": NpyAppender(self.out_dir / f"{s}_dense.npy", np.float32, num_dense),
                "sparse": NpyAppender(self.out_dir / f"{s}_sparse.npy", sparse_dtype, num_sparse),
                "label": NpyAppender(self.out_dir / f"{s}_label.npy", np.uint8),
            }
            for s in SPLITS
        }
        self.positives = dict.fromkeys(SPLITS, 0)

    def append(self, split: str, dense: np.ndarray, sparse: np.ndarray, label: np.ndarray) -> None:
        if len(label) == 0:
            return
        f = self.files[split]
        f["dense"].append(dense)
        f["sparse"].append(sparse)
        f["label"].append(label)
        self.positives[split] += int(np.count_nonzero(label))

    def close(self) -> tuple[dict[str, int], dict[str, float]]:
        rows = {}
        for s, f in self.files.items():
            rows[s] = f["label"].close()
            f["dense"].close()
            f["sparse"].close()
        rates = {s: (self.positives[s] / rows[s] if rows[s] else 0.0) for s in SPLITS}
        return rows, rates


class VocabCounter:
    """Streaming per-feature value counts (hash-based, via Arrow), merged lazily to stay amortised."""

    def __init__(self):
        self._merged: pa.Table | None = None
        self._pending: list[pa.Table] = []
        self._pending_len = 0

    def add(self, values) -> None:
        vc = pc.value_counts(pa.array(values) if not isinstance(values, pa.Array) else values)
        t = pa.table({"v": vc.field("values"), "c": vc.field("counts")})
        self._pending.append(t)
        self._pending_len += len(t)
        if self._pending_len > max(1 << 18, len(self._merged) if self._merged is not None else 0):
            self._merge()

    def _merge(self) -> None:
        parts = ([self._merged] if self._merged is not None else []) + self._pending
        if not parts:
            return
        t = pa.concat_tables(parts).group_by("v").aggregate([("c", "sum")])
        self._merged = t.select(["v", "c_sum"]).rename_columns(["v", "c"])
        self._pending, self._pending_len = [], 0

    def vocabulary(self, min_frequency: int = 1) -> pa.Array:
        """Sorted values seen at least ``min_frequency`` times (id = 1 + position; id 0 = rare/unseen)."""
        self._merge()
        if self._merged is None:
            return pa.array([], pa.null())
        t = self._merged
        if min_frequency > 1:
            t = t.filter(pc.greater_equal(t["c"], min_frequency))
        values = t["v"].combine_chunks()
        return values.take(pc.sort_indices(values))


class SortedCounter:
    """Streaming value counts of one integer feature by sorting, for numeric ids (Criteo's uint32).

    Same vocabulary as ``VocabCounter``, cheaper: numpy's vectorised sort plus run lengths costs
    ~5 ns a value where Arrow's hash ``value_counts`` costs ~20 here, and both release the GIL.
    Each block becomes (sorted distinct values, counts); the pieces are merged, summing the counts
    of equal values, once they outgrow the merged table, so merging stays amortised.
    """

    def __init__(self, dtype=np.uint32):
        self.dtype = np.dtype(dtype)
        self._values = np.zeros(0, self.dtype)
        self._counts = np.zeros(0, np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_len = 0

    def add(self, values: np.ndarray) -> None:
        if len(values) == 0:
            return
        self.add_counts(*count_sorted(np.asarray(values, self.dtype)))

    def add_counts(self, values: np.ndarray, counts: np.ndarray) -> None:
        """Add already counted (distinct sorted values, counts), e.g. from ``count_sorted`` in a worker."""
        self._pending.append((values, counts))
        self._pending_len += len(values)
        if self._pending_len > max(1 << 18, len(self._values)):
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        values = np.concatenate([self._values, *(v for v, _ in self._pending)])
        counts = np.concatenate([self._counts, *(c for _, c in self._pending)])
        self._pending, self._pending_len = [], 0
        order = np.argsort(values)
        values, counts = values[order], counts[order]
        first = _run_starts(values)
        self._values, self._counts = values[first], np.add.reduceat(counts, first)

    def vocabulary(self, min_frequency: int = 1) -> np.ndarray:
        """Sorted values seen at least ``min_frequency`` times (id = 1 + position; id 0 = rare/unseen)."""
        self._merge()
        if min_frequency > 1:
            return self._values[self._counts >= min_frequency]
        return self._values


def count_sorted(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values in increasing order, how often each occurs) of ``values``."""
    return run_lengths(np.sort(values))


def run_lengths(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values, run lengths) of an already sorted array."""
    first = _run_starts(sorted_values)
    return sorted_values[first], np.diff(first, append=len(sorted_values))


def _run_starts(sorted_values: np.ndarray) -> np.ndarray:
    """Index of the first element of each run of equal values (an empty array for no values)."""
    if len(sorted_values) == 0:
        return np.zeros(0, np.intp)
    change = np.empty(len(sorted_values), bool)
    change[0] = True
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=change[1:])
    return np.flatnonzero(change)


def remap_sorted(values: np.ndarray, vocab: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Map raw values to 1 + their index in the sorted ``vocab``; values not in it map to 0.
    ``out`` (int32, contiguous, shaped like ``values``) receives the ids without a temporary copy."""
    if out is None:
        out = np.empty(values.shape, np.int32)
    if len(vocab) == 0:
        out[...] = 0
        return out
    if len(vocab) <= 4 * len(values):  # a hash lookup beats binary search unless the vocab is huge
        idx = pc.fill_null(pc.index_in(pa.array(values), value_set=pa.array(vocab)), -1)
        np.add(idx.to_numpy(), 1, out=out)
        return out
    idx = np.searchsorted(vocab, values)
    np.minimum(idx, len(vocab) - 1, out=idx)
    found = vocab[idx] == values
    np.copyto(out, np.where(found, idx + 1, 0))
    return out


def meta_fields(**kw) -> dict:
    """Keep only CacheMeta fields a source may set (fingerprint and name come from build_cache)."""
    allowed = {f.name for f in dataclasses.fields(CacheMeta)} - {"fingerprint", "name"}
    unknown = set(kw) - allowed
    if unknown:
        raise KeyError(f"unknown meta fields {sorted(unknown)}")
    return kw
