"""The on-disk cache: atomic build, fingerprints, incremental ``.npy`` writers and vocabularies.

A cache directory ``<root>/<name>-<fingerprint[:12]>`` holds, per split s in train/val/test,
``s_dense.npy`` (float32, N x num_dense, log1p already applied), ``s_sparse.npy`` (int32, N x F,
vocabulary ids) and ``s_label.npy`` (uint8, N), plus ``meta.json``, written last. A directory whose
``meta.json`` is missing or carries another fingerprint is never loaded.

Concurrent builders (a sweep, several nodes on a shared disk) are safe: a builder holds an exclusive
file lock (``filelock``) on ``<root>/<name>-<fp>.lock`` while it builds, so the others wait and then reuse its
cache; it builds into a unique ``<final>.tmp-<pid>-<token>`` and renames it into place. A valid final
directory is never deleted or replaced: if one appears (a builder without the lock won), the new build
is discarded. Where the file system has no locks, the rename rules alone keep a valid cache.

Integrity. ``meta.json`` records a content digest of every array (xxh3-128, or BLAKE2b where xxhash is missing)
and of every data file the cache was built from, with the file's size, mtime, ctime and inode. Each time a run
opens the cache (``build_cache``) the arrays' sizes and digests are checked, and each data file whose stat differs
from the recorded one is digested again: a user can set a file's mtime back (``touch -d``) but not its ctime, so
an edit in place, same size and mtime restored, is still noticed. A cache that fails (truncated, overwritten, a
data file changed since) is rebuilt with one warning; where the cache root cannot be written, it is refused in one
line naming the file. Cost: the arrays are read once per open, bound by the disk (figures: docs/data.md, "Cache
integrity"); a second open in the same process whose files' stats did not change is not read again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from umec_lightning.data.core import SPLITS, CacheMeta, DataError, load_meta
from umec_lightning.locks import LockUnavailable, exclusive

try:
    import xxhash  # a dependency of wandb, so installed with the project; BLAKE2b (slower) if not
except ImportError:
    xxhash = None

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


# --- integrity ------------------------------------------------------------------------------------------------------

DIGEST = "xxh3_128" if xxhash is not None else "blake2b-128"
_DIGEST_CHUNK = 8 << 20  # read into one reused buffer: bounded memory, no mapped pages piling up


def _hasher(algorithm: str):
    if algorithm == "xxh3_128" and xxhash is not None:
        return xxhash.xxh3_128()
    if algorithm == "blake2b-128":
        return hashlib.blake2b(digest_size=16)
    return None


def file_digest(path: str | Path, algorithm: str = DIGEST) -> str:
    """Content digest of a whole file, read in 8 MiB chunks into one buffer. xxh3-128 hashes faster than a disk
    reads, so the disk is the bound (figures: docs/data.md, "Cache integrity")."""
    h = _hasher(algorithm)
    if h is None:
        raise ValueError(f"unknown digest {algorithm!r}")
    buf = bytearray(_DIGEST_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> tuple:
    """What changes whenever a file's content is written: ctime cannot be set back by a user, unlike mtime."""
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def source_state(path: str | Path, digest: bool = True) -> dict:
    """A data file as meta.json records it: resolved path, stat and (``digest``) content digest."""
    p = Path(path).resolve()
    size, mtime_ns, ctime_ns, inode = _stat_key(p.stat())
    state = {"path": str(p), "size": size, "mtime_ns": mtime_ns, "ctime_ns": ctime_ns, "inode": inode}
    if digest:
        state["digest"] = file_digest(p)
    return state


def _same_stat(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("size", "mtime_ns", "ctime_ns", "inode"))


def source_files(source) -> list[Path]:
    """The data files a source reads (none for generated data, or a source that does not say)."""
    files = getattr(source, "source_files", None)
    return [Path(f) for f in files()] if files is not None else []


def integrity_record(cache_dir: Path, sources: list[dict]) -> dict:
    """meta.json's ``integrity``: the digest of every array in ``cache_dir`` and the states of the data files."""
    arrays = {
        p.name: {"bytes": p.stat().st_size, "digest": file_digest(p)} for p in sorted(Path(cache_dir).glob("*.npy"))
    }
    return {"algorithm": DIGEST, "arrays": arrays, "sources": sources}


# Caches this process verified, by directory: the stat of each file then. A cache opened again (every
# Trainer.fit/validate/test calls prepare_data) whose files' stats did not change is not read again.
_VERIFIED: dict[str, tuple] = {}


def _snapshot(path: Path, meta, files: list[Path]) -> tuple:
    names = sorted(meta.integrity["arrays"]) + ["meta.json"]
    return tuple((n, _stat_key((path / n).stat())) for n in names) + tuple((str(f), _stat_key(f.stat())) for f in files)


def _structure_problem(path: Path, fingerprint: str):
    """(meta, None) if ``path`` holds a complete cache of ``fingerprint`` whose arrays have the sizes recorded at
    build, else (meta or None, why not: one line naming the file). Reads no array."""
    try:
        meta = load_meta(path)
    except DataError as e:
        return None, str(e)
    if meta.fingerprint != fingerprint:
        return meta, f"{path / 'meta.json'}: built for another fingerprint ({meta.fingerprint[:12]})"
    record = meta.integrity or {}
    arrays = record.get("arrays")
    if not arrays:
        return meta, f"{path / 'meta.json'}: no content digests (a cache from an earlier version)"
    if _hasher(record.get("algorithm", "")) is None:
        return meta, f"{path / 'meta.json'}: digests made with {record.get('algorithm')!r}, not available here"
    for name in (f"{s}_{k}.npy" for s in SPLITS for k in ("dense", "sparse", "label")):
        if name not in arrays:
            return meta, f"{path / name}: not in the cache's digests"
    for name, want in arrays.items():
        try:
            size = (path / name).stat().st_size
        except OSError:
            return meta, f"{path / name}: missing"
        if size != want["bytes"]:
            return meta, f"{path / name}: {size} bytes, {want['bytes']} when built (truncated or overwritten)"
    return meta, None


def _valid_cache(path: Path, fingerprint: str) -> bool:
    """Complete, of this fingerprint, every array of its recorded size (the content is checked by verify_cache)."""
    return _structure_problem(path, fingerprint)[1] is None


def verify_cache(path: Path, fingerprint: str, files: list[Path] | None = None) -> str | None:
    """None if the cache at ``path`` is complete and intact and was built from the data files ``files`` as they
    are now; else why not, in one line naming the file (``missing`` when there is no cache at all).

    Every array is digested (unless this process verified it already and no stat changed since); a data file is
    digested only when its stat differs from the recorded one (see the module docstring)."""
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return "missing"
    meta, problem = _structure_problem(path, fingerprint)
    if problem is not None:
        return problem
    files = [Path(f) for f in files or []]
    try:
        snapshot = _snapshot(path, meta, files)
    except OSError as e:
        return f"{e.filename}: {e.strerror}"
    if _VERIFIED.get(str(path)) == snapshot:
        return None
    record = meta.integrity
    algorithm = record["algorithm"]
    start, total = time.perf_counter(), 0
    for name, want in record["arrays"].items():
        total += want["bytes"]
        try:
            digest = file_digest(path / name, algorithm)
        except OSError as e:  # moved aside by a process rebuilding it under the lock: take the lock and wait
            return f"{e.filename}: {e.strerror}"
        if digest != want["digest"]:
            return f"{path / name}: content differs from its {algorithm} digest recorded when the cache was built"
    recorded = {s["path"]: s for s in record.get("sources") or []}
    for f in files:
        was = recorded.get(str(f.resolve()))
        if was is None:
            continue
        now = source_state(f, digest=False)
        if _same_stat(now, was):
            continue
        total += now["size"]
        if file_digest(f, algorithm) != was.get("digest"):
            return f"{f}: the data file changed since the cache was built (its content digest differs)"
        log.info("%s: its inode or ctime changed since the cache was built, its content did not", f)
    seconds = time.perf_counter() - start
    log.info("verified cache %s: %.2f GB in %.1f s", path, total / 1e9, seconds)
    _VERIFIED[str(path)] = snapshot
    return None


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
    lock is held (False where the file system has none). No lock file is left behind: the holder removes it
    before unlocking, and a waiter that then got the lock on the removed file locks the new one
    (``umec_lightning.locks.exclusive``)."""
    with ExitStack() as held:
        try:
            held.enter_context(exclusive(root / f"{stem}.lock", remove=True,
                                         waiting=f"another process is building {root / stem}: waiting for it"))
        except LockUnavailable as e:
            log.warning("%s: building without a lock", e)
            yield False
            return
        yield True


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


def build_cache(source, cache_root: str | Path, root_key: str = "loader.cache_root") -> Path:
    """Build (or reuse) the cache of ``source`` under ``cache_root`` and return its directory.

    A cache found there is verified first (``verify_cache``); one that fails is rebuilt, with one warning, or
    refused in one line naming the file when ``cache_root`` (config key ``root_key``) cannot be written.
    The arrays are written into ``<final>.tmp-<pid>-<token>``; ``meta.json`` is written last and the
    directory is then renamed into place, so an interrupted build never leaves a loadable cache behind.
    Builders of the same cache take turns (see the module docstring): the later ones reuse it.
    """
    root = Path(cache_root)
    fingerprint = source.fingerprint()
    final = root / f"{source.name}-{fingerprint[:12]}"
    files = source_files(source)
    problem = verify_cache(final, fingerprint, files)
    if problem is None:
        log.info("reusing cache %s", final)
        return final
    damaged = None if problem == "missing" else problem
    _check_writable(root, final, root_key, damaged)
    if damaged is not None:
        log.warning("%s: rebuilding the cache %s", damaged, final.name)
    with build_lock(root, final.name) as locked:
        if verify_cache(final, fingerprint, files) is None:
            log.info("reusing cache %s (built by another process meanwhile)", final)
            return final
        _clean_stale_tmp(root, final.name, locked)
        _remove_damaged(final, fingerprint, files, locked)
        tmp = root / f"{final.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            sources = [source_state(f) for f in files]
            fields = dict(source.write(tmp))
            _check_unchanged(sources)
            meta = CacheMeta(
                fingerprint=fingerprint, name=source.name, integrity=integrity_record(tmp, sources), **fields
            )
            staged = tmp / "meta.json.partial"
            staged.write_text(meta.to_json())
            os.replace(staged, tmp / "meta.json")
            installed = install_cache(tmp, final, fingerprint)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if installed:
        _VERIFIED[str(final)] = _snapshot(final, meta, files)  # just written and digested: no need to read it again
        log.info("built cache %s (%s)", final, meta.rows)
    else:
        log.info("reusing cache %s (another process finished it first; this build was discarded)", final)
    return final


def _check_writable(root: Path, final: Path, root_key: str, damaged: str | None) -> None:
    """DataError, one line, if no cache can be built under ``root``: before any lock file or build is tried."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{final.name}.probe-", dir=root)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        why = e.strerror or type(e).__name__
        if damaged is not None:
            raise DataError(
                f"{damaged}; the cache cannot be rebuilt: {root} is not writable ({why}); set {root_key} to a"
                f" writable directory, or have {final} deleted"
            ) from None
        raise DataError(
            f"{root}: cannot build the data cache there ({why}); set {root_key} to a writable directory"
        ) from None


def _remove_damaged(final: Path, fingerprint: str, files: list[Path], locked: bool) -> None:
    """Move a cache that failed verification out of the way (``install_cache`` keeps a structurally valid one),
    then delete it; renamed first, so no reader sees it half deleted. Without the build lock another builder may
    have installed a good one meanwhile: what was moved aside goes back if it verifies after all."""
    if not (final.exists() or final.is_symlink()):
        return
    _VERIFIED.pop(str(final), None)
    aside = final.with_name(f"{final.name}.tmp-{os.getpid()}-bad{secrets.token_hex(4)}")
    try:
        os.replace(final, aside)
    except FileNotFoundError:
        return
    if not locked and verify_cache(aside, fingerprint, files) is None:
        try:
            os.replace(aside, final)
            return
        except OSError:
            pass  # yet another one is in place
    shutil.rmtree(aside, ignore_errors=True)


def _check_unchanged(sources: list[dict]) -> None:
    """A data file written to while its cache was built would leave a cache of neither version: refuse it."""
    for was in sources:
        if not _same_stat(source_state(was["path"], digest=False), was):
            raise DataError(f"{was['path']}: changed while its cache was being built; run again once it is complete")


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

    Same vocabulary as ``VocabCounter``, cheaper: numpy's vectorised sort plus run lengths beats
    Arrow's hash ``value_counts`` (docs/performance.md, "Preprocessing"), and both release the GIL.
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
    allowed = {f.name for f in dataclasses.fields(CacheMeta)} - {"fingerprint", "name", "integrity"}
    unknown = set(kw) - allowed
    if unknown:
        raise KeyError(f"unknown meta fields {sorted(unknown)}")
    return kw
