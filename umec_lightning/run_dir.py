"""A run's directory: one run at a time, no silent overwrite of an earlier run, and a record of a failure.

- **Lock.** A run holds a file lock on `<run dir>/.run.lock` (`filelock`) for as long as it runs; who holds it (pid,
  host, start, command) is in the side file `.run.lock.holder`. A second run into the same dir is refused in one line
  naming the dir and the holder.
- **Used dirs.** A dir that holds a run's outputs (anything but Hydra's `.hydra/` and `*.log`, the lock files and a
  failed run's `failed.json`) is refused unless `resume=true` (continue that run) or `overwrite=true` (clear those
  outputs first, then start over).
- **Failures.** A run that fails writes `failed.json` (the one-line reason; for a bug also the traceback), as a
  failed multirun member does (`sweep.run_member`), so the dir says what happened; the next run in the dir removes it.

The Hydra callback `RunDirGuard` (`hydra.callbacks.run_dir` in conf/config.yaml) claims the dir in `on_run_start`,
before Hydra writes `.hydra/` and opens `train.log`: a refused launch changes nothing in the dir, and `overwrite=true`
clears the earlier run's `.hydra/` and logs too. `run.run()` claims the dir itself when no callback did (the API,
tests); then this launch's `.hydra/` and `*.log` stay. Processes that a multi-process launch starts for ranks > 0
(Lightning's DDP launcher, torchrun, srun) claim nothing: rank 0 holds the dir for them.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .config import ConfigError

log = logging.getLogger(__name__)

LOCK = ".run.lock"
HOLDER = ".run.lock.holder"
FAILED = "failed.json"  # the same name as a failed multirun member's (sweep.FAILED)
# What a dir holds that is not a run's outputs: Hydra's record of a launch and its logs, the lock, a failure record.
NOT_OUTPUTS = (".hydra", LOCK, HOLDER, FAILED)
# What only this project's runs write: `overwrite=true` clears a dir that holds one of these, and no other.
RUN_MARKERS = ("run_config.json", "summary.json", "phases", "checkpoints", FAILED)
# The rank a multi-process launcher gives each process (Lightning's DDP launcher, torchrun, srun).
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GLOBAL_RANK", "SLURM_PROCID")


class RunDirError(ConfigError):
    """The run dir cannot be used by this run: another run holds it, or it holds an earlier run's outputs."""


def launched_rank_zero() -> bool:
    """False in a process a multi-process launch started for a rank other than 0 (its environment says so)."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "").strip()
        if value and value != "0":
            return False
    return True


def run_outputs(run_dir: Path) -> list[str]:
    """The entries of `run_dir` that are a run's outputs (sorted; folders with a trailing `/`)."""
    if not run_dir.is_dir():
        return []
    found = []
    for entry in sorted(run_dir.iterdir()):
        if entry.name in NOT_OUTPUTS or (entry.suffix == ".log" and entry.is_file()):
            continue
        found.append(entry.name + ("/" if entry.is_dir() else ""))
    return found


@dataclass
class Claim:
    """This process's hold on a run dir (`claim`); `release()` lets the next run in."""

    run_dir: Path
    lock: FileLock | None

    def release(self) -> None:
        if _held.get(self.run_dir) is not self:
            return
        del _held[self.run_dir]
        if self.lock is not None:
            (self.run_dir / HOLDER).unlink(missing_ok=True)
            self.lock.release(force=True)


_held: dict[Path, Claim] = {}


def holding(run_dir: str | os.PathLike) -> bool:
    """Whether this process holds `run_dir` (a `Claim` not yet released)."""
    return Path(os.path.abspath(run_dir)) in _held


def claim(run_dir: str | os.PathLike, resume: bool, overwrite: bool, before_hydra: bool = False) -> Claim | None:
    """Take `run_dir` for this run: lock it, refuse it when another run holds it or it holds an earlier run's
    outputs (unless `resume`, or `overwrite`: those outputs are cleared first), remove a stale `failed.json`.
    RunDirError in one line otherwise, before anything in the dir changed. `before_hydra`: called before Hydra
    wrote this launch's `.hydra/` and logs (so an earlier launch's are cleared by `overwrite` too).
    Returns None where there is nothing to release: this process holds the dir already, or it is a rank > 0."""
    run_dir = Path(os.path.abspath(run_dir))
    if run_dir in _held or not launched_rank_zero():
        return None
    if resume and overwrite:
        raise RunDirError("config keys `resume` and `overwrite` are both true: resume=true continues the run in "
                          f"{run_dir}, overwrite=true clears it and starts over; set one")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock(run_dir)
    try:
        found = run_outputs(run_dir)
        if found and not resume:
            if not overwrite:
                raise RunDirError(f"run dir {run_dir} already holds {_what(run_dir)} ({_listed(found)}): "
                                  "resume=true continues it, overwrite=true clears it and starts over, or give this "
                                  "run another hydra.run.dir")
            _clear(run_dir, found, before_hydra)
        (run_dir / FAILED).unlink(missing_ok=True)  # a failed earlier launch's: this one decides now
    except BaseException:
        if lock is not None:
            (run_dir / HOLDER).unlink(missing_ok=True)
            lock.release(force=True)
        raise
    held = _held[run_dir] = Claim(run_dir, lock)
    atexit.register(held.release)
    return held


def _lock(run_dir: Path) -> FileLock | None:
    lock = FileLock(run_dir / LOCK, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunDirError(f"run dir {run_dir} is in use by another run ({_holder(run_dir)}): wait for it to end, or "
                          "give this run another hydra.run.dir") from None
    except OSError as err:  # a file system without locks (and no soft fallback): the checks below still hold
        log.warning("cannot lock the run dir %s (%s): a second run into it would not be refused", run_dir, err)
        return None
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)}
    try:
        (run_dir / HOLDER).write_text(json.dumps(holder) + "\n")
    except OSError as err:
        log.warning("cannot record the run dir's holder in %s (%s)", run_dir / HOLDER, err)
    return lock


def _holder(run_dir: Path) -> str:
    try:
        holder = json.loads((run_dir / HOLDER).read_text())
        return f"pid {holder['pid']} on host {holder['host']}, since {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"holder unknown: {run_dir / HOLDER} is missing or unreadable"


def _what(run_dir: Path) -> str:
    """What an earlier run left: finished, failed (with its reason) or unfinished."""
    if (run_dir / "summary.json").exists():
        return "the outputs of a finished run"
    try:
        failed = json.loads((run_dir / FAILED).read_text())
        return f"the outputs of a run that failed ({failed.get('error', '?')})"
    except (OSError, ValueError, AttributeError):
        return "the outputs of an unfinished run"


def _listed(names: list[str], shown: int = 6) -> str:
    return ", ".join(names[:shown]) + (f", and {len(names) - shown} more" if len(names) > shown else "")


def _clear(run_dir: Path, found: list[str], before_hydra: bool) -> None:
    """`overwrite=true`: remove an earlier run's outputs (and before Hydra's, its `.hydra/` and logs); only from a
    dir that this project's runs wrote (one of RUN_MARKERS), never from any other folder."""
    if not any((run_dir / name).exists() for name in RUN_MARKERS):
        raise RunDirError(f"overwrite=true: run dir {run_dir} holds files that are not a run's outputs "
                          f"({_listed(found)}); overwrite clears run dirs only: give this run another hydra.run.dir")
    names = [name.rstrip("/") for name in found] + [FAILED]
    if before_hydra:
        names += [e.name for e in run_dir.iterdir() if e.name == ".hydra" or (e.suffix == ".log" and e.is_file())]
    for name in names:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    log.warning("overwrite=true: cleared the earlier run's outputs from %s (%s)", run_dir, _listed(found))


def record_failure(run_dir: str | os.PathLike, err: BaseException) -> Path | None:
    """Write `<run dir>/failed.json`: the one-line reason (a bug's traceback beside it). Never raises: a run that
    failed for want of disk space may not be able to write it either."""
    from .errors import USER_ERRORS

    user_error = isinstance(err, USER_ERRORS)
    reason = " ".join(str(err).split()) or type(err).__name__
    record: dict[str, Any] = {"error": f"{type(err).__name__}: {reason}", "user_error": user_error,
                              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
    if not user_error:
        record["traceback"] = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    path = Path(run_dir) / FAILED
    try:
        from .io import write_json

        return write_json(path, record)
    except Exception as write_err:  # noqa: BLE001 - the run's own error is what the user must see
        log.warning("could not write %s (%s)", path, write_err)
        return None


class RunDirGuard(Callback):
    """Hydra callback: claims a single run's dir (`claim`) before Hydra writes into it; a refusal is one line
    `error: ...` and exit status 2, as train.py's other bad input. Multirun members are claimed by `run.run()`."""

    def __init__(self) -> None:
        self._claim: Claim | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            self._claim = claim(str(config.hydra.run.dir), resume=bool(config.get("resume", False)),
                                overwrite=bool(config.get("overwrite", False)), before_hydra=True)
        except RunDirError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)  # SystemExit passes Hydra's callback error handling (it only catches Exception)

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._claim is not None:
            self._claim.release()
            self._claim = None
