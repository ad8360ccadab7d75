"""Atomic file writes: a reader never sees a half-written file, an interrupted write leaves the old one.

JSON files are strict JSON: NaN and ±Infinity (which `json.dumps` writes as bare `NaN`, `Infinity`, tokens no strict
parser reads) become `null`, with one warning naming the file and the keys (e.g. a test AUC on one class)."""

from __future__ import annotations

import errno
import functools
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

# A write that failed for want of room: no space, over quota, or over a file-size limit (RLIMIT_FSIZE, `ulimit -f`).
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class DiskFullError(OSError):
    """A file could not be written for want of room; the message names the file and the bytes it needs. The file
    it would have replaced is intact (every write here goes to a temporary file first)."""

    def __init__(self, path: Path, needed: int | None, cause: OSError):
        try:
            free = f"{shutil.disk_usage(Path(path).parent).free:,} bytes free there"
        except OSError:
            free = "free space unknown"
        self.path, self.needed = Path(path), needed
        size = "room for a new file" if needed is None else f"{needed:,} bytes"
        self.message = (f"disk full writing {path}: it needs {size}, {free} ({os.strerror(cause.errno)}); "
                        f"{Path(path).name} was not replaced")
        super().__init__(cause.errno, self.message)

    def __str__(self) -> str:
        return self.message


class _Counted:
    """The file `_atomic` hands its writer: it counts the bytes given and, after a write that found no room, only
    counts (no exception inside torch.save's C++ writer), so the error can say how many bytes the file needs."""

    def __init__(self, file):
        self._file, self.count, self.error = file, 0, None
        self._at = 0  # the position written to next; `count` is the furthest written (a zip writer seeks back)

    def _guard(self, action) -> None:
        if self.error is None:
            try:
                action()
            except OSError as err:
                if err.errno not in _NO_ROOM:
                    raise
                self.error = err

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        self._at += size
        self.count = max(self.count, self._at)
        self._guard(lambda: self._file.write(data))
        return size

    def flush(self) -> None:
        self._guard(self._file.flush)

    def tell(self) -> int:
        return self._at

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._at = {os.SEEK_SET: 0, os.SEEK_CUR: self._at, os.SEEK_END: self.count}[whence] + offset
        self._guard(lambda: self._file.seek(self._at))
        return self._at


def _atomic(path: Path, write) -> Path:
    """`write(file)` into a temporary file next to `path`, fsync, then rename it onto `path` (and fsync the folder).
    A write that finds no room raises DiskFullError (path, bytes needed); `path` is then untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:  # no room for even an empty file (no free inode)
        if err.errno in _NO_ROOM:
            raise DiskFullError(path, None, err) from None
        raise
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # as open() would create it (mkstemp makes it private to the owner)
        file = os.fdopen(fd, "wb")
        counted = _Counted(file)
        try:
            write(counted)
            counted.flush()
            counted._guard(lambda: os.fsync(file.fileno()))  # delayed allocation reports ENOSPC here
        finally:
            counted._guard(file.close)  # a close that flushes the rest of a full buffer fails the same way
        if counted.error is not None:
            raise DiskFullError(path, counted.count, counted.error) from None
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


@functools.cache
def _umask() -> int:
    mask = os.umask(0o022)  # read by setting it: set it straight back
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort: some file systems cannot open or sync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


log = logging.getLogger(__name__)


def finite_json(obj, where: str = "") -> tuple[object, list[str]]:
    """``obj`` with every float that is NaN or infinite replaced by None, and where they were (``a.b[2]``)."""
    found: list[str] = []

    def walk(x, at: str):
        if isinstance(x, float):
            if math.isfinite(x):
                return x
            found.append(f"{at or '<top>'} ({x})")
            return None
        if isinstance(x, dict):
            return {k: walk(v, f"{at}.{k}" if at else str(k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{at}[{i}]") for i, v in enumerate(x)]
        return x

    return walk(obj, where), found


def write_json(path: Path, obj) -> Path:
    """Write ``obj`` as strict JSON: a non-finite float is written as null, with a warning naming it."""
    obj, non_finite = finite_json(obj)
    if non_finite:
        log.warning("%s: not a finite number, written as null: %s", path, ", ".join(non_finite))
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    return _atomic(path, lambda f: f.write(text.encode()))


def write_text(path: Path, text: str) -> Path:
    return _atomic(path, lambda f: f.write(text.encode()))


def write_bytes(path: Path, data: bytes) -> Path:
    return _atomic(path, lambda f: f.write(data))


def save_torch(path: Path, obj, compact: bool = False) -> Path:
    """torch.save `obj` to `path` atomically; `compact`: as `archive.compact_archive` rewrites it (pickles deflated,
    one short folder name: a served file's own bytes halved), by way of a temporary file beside it."""
    if not compact:
        return _atomic(path, lambda f: torch.save(obj, f))

    def write(file) -> None:
        from .archive import compact_archive

        with tempfile.TemporaryFile(dir=Path(path).parent) as raw:
            counted = _Counted(raw)
            torch.save(obj, counted)
            if counted.error is not None:
                raise DiskFullError(path, counted.count, counted.error) from None
            raw.seek(0)
            compact_archive(raw, file)

    return _atomic(path, write)
