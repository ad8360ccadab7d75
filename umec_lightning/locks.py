"""File locks between processes, all on `filelock` (an OS lock, released when its holder closes it or dies): the data
cache's build lock and the shared dense reference's lock here (`exclusive`), the run dir's in `run_dir.py`.

`exclusive(path, remove=True)` leaves no lock file behind, safely. Only the holder removes the file, before it
unlocks; a waiter that then gets the lock on the removed file (opened before) would hold it together with a newcomer
that created a fresh one, so after every acquisition the locked file is checked to be the one at the path (same
inode), else the new one is locked. Some filelock 3.2x releases remove the file themselves on release (the same way:
before unlocking, refusing a lock on a removed file); there the removal is left to them, as removing it twice could
remove a newcomer's file.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)


class LockUnavailable(OSError):
    """No lock could be taken on this file system (the lock file cannot be created, or it has no locks)."""


def _new_lock(path: Path) -> FileLock:
    # filelock 4 falls back to an existence lock where the file system has no OS locks; a crashed holder's file would
    # then block every later run. Refused instead (LockUnavailable): the callers decide what to do without a lock.
    options = {"fallback_to_soft": False} if "fallback_to_soft" in inspect.signature(FileLock).parameters else {}
    return FileLock(path, **options)


def _descriptor(lock: FileLock) -> int | None:
    """The descriptor a held lock is on (filelock's context: the same attribute in 3.12 and 4.3), or None."""
    return getattr(getattr(lock, "_context", None), "lock_file_fd", None)


@functools.cache
def _filelock_removes_its_file() -> bool:
    """Whether this filelock version removes a Unix lock file itself on release (probed once, in a temp dir)."""
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "probe.lock"
            lock = _new_lock(path)
            lock.acquire(timeout=10)
            lock.release()
            return not path.exists()
    except (OSError, NotImplementedError, Timeout):
        return False


def _acquire(lock: FileLock, waiting: str | None) -> None:
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if waiting:
            log.info("%s", waiting)
        lock.acquire()  # blocks until the holder releases (or dies)


@contextmanager
def exclusive(path: str | os.PathLike, *, remove: bool = False, waiting: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if missing) for the block, waiting for another holder
    (logging `waiting` first, if given). `remove`: no lock file is left when the block ends (module docstring).
    LockUnavailable where the file system gives no lock."""
    path = Path(path)
    own_removal = remove and not _filelock_removes_its_file()
    while True:
        lock = _new_lock(path)
        try:
            _acquire(lock, waiting)
        except (OSError, NotImplementedError) as err:  # filelock 3 says NotImplementedError where flock is missing
            raise LockUnavailable(f"no file lock on {path}: {err}") from err
        fd = _descriptor(lock) if own_removal else None
        if fd is None:  # nothing to check: the file stays (or filelock removes it as it should); none: cannot check
            break
        try:
            current = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            current = False
        if current:
            break
        lock.release()  # the file was removed (and maybe created again) while this process waited: lock the new one
    try:
        yield
    finally:
        try:
            if fd is not None:
                with suppress(OSError):  # removed before unlocking: a waiter on it will see it removed
                    path.unlink()
        finally:
            lock.release()
