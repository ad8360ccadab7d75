"""Checkpoints written atomically, the previous resume point kept, and a damaged one passed over on resume.

Lightning's own writer (`TorchCheckpointIO`, through fsspec) stages a checkpoint in the system's temporary folder
and *moves* it into place: a copy when that folder is on another file system, so a full disk left a truncated
`epoch-end.ckpt` under its final name, which the resume then failed to read ("failed finding central directory").
`AtomicCheckpointIO` (every Trainer of a run has it, `stages.training.make_trainer`) writes each checkpoint as
`io.save_torch` writes any file: into a temporary file in the same folder, fsync, rename. A reader finds the old
file or the new one, never part of one; a full disk is one line (`io.DiskFullError`: the file, the bytes it needs)
and the old file stays.

Before a new `epoch-end.ckpt` replaces the old one, the old one stays as `epoch-end.prev.ckpt` (a hard link: no copy);
`stages.training.fit_phase` removes it when the stage's fit ends. `resume_point` resumes from the newest of the two that
reads, and says in one line when it passes over a damaged one, which it moves aside (`<name>.damaged`, kept).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from .io import save_torch
from .sharded.checkpoint import SHARDED_KEY, read_checkpoint, shard_paths

log = logging.getLogger(__name__)

RESUME_NAME = "epoch-end.ckpt"  # the resume point of a stage (stages.training.make_trainer)
DAMAGED_SUFFIX = ".damaged"


def previous_path(path: str | os.PathLike) -> Path:
    """`epoch-end.ckpt` -> `epoch-end.prev.ckpt`."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic writes (`io.save_torch`) that keeps the file it replaces under
    `previous_path` when its name is one of `keep_previous` (a sharded checkpoint keeps none: its table shards,
    written beside it, are replaced in place)."""

    def __init__(self, keep_previous: tuple[str, ...] = (RESUME_NAME,)):
        super().__init__()
        self.keep_previous = tuple(keep_previous)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options")
        path = Path(path)
        if path.name in self.keep_previous and SHARDED_KEY not in checkpoint:
            _link_previous(path)
        save_torch(path, checkpoint)


def _link_previous(path: Path) -> None:
    """`path` stays readable as `previous_path(path)` once a new file replaces it (a second name, no copy)."""
    if not path.exists():
        return
    previous = previous_path(path)
    staged = previous.with_name(f".{previous.name}.{os.getpid()}.tmp")
    try:
        staged.unlink(missing_ok=True)
        os.link(path, staged)
        os.replace(staged, previous)
    except OSError as err:  # a file system without hard links: no previous resume point, the write goes on
        staged.unlink(missing_ok=True)
        log.debug("no previous checkpoint kept for %s (%s)", path, err)


def discard_previous(folder: str | os.PathLike) -> None:
    """Remove the previous resume point of a stage whose fit ended (its `epoch-end.ckpt` is final)."""
    previous_path(Path(folder) / RESUME_NAME).unlink(missing_ok=True)


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step a checkpoint was written at (the step its logged rows carry); raises when it cannot be read whole:
    a truncated or foreign file, or a sharded checkpoint with a table shard missing."""
    head = read_checkpoint(path, tables=False)  # memory-mapped: the tables are not read
    info = head.get(SHARDED_KEY)
    if info is not None:
        missing = [str(p) for p in shard_paths(path, int(info["world_size"])) if not p.exists()]
        if missing:
            raise FileNotFoundError(f"its table shard {missing[0]} is missing")
    loop = head.get("loops", {}).get("fit_loop", {}).get("epoch_loop.state_dict", {})
    return int(loop.get("_batches_that_stepped", head["global_step"]))


def resume_point(folder: str | os.PathLike, rank_zero: bool = True) -> tuple[Path, int] | None:
    """The checkpoint a stage resumes from and its step: `epoch-end.ckpt`, or, when that cannot be read, the previous
    one (`epoch-end.prev.ckpt`). A damaged file is named in one warning (on `rank_zero`, which also moves it aside to
    `<name>.damaged`, so that it is neither read again nor kept as the previous one). None: nothing to resume from."""
    current = Path(folder) / RESUME_NAME
    damaged: list[str] = []
    found = None
    for path in (current, previous_path(current)):
        if not path.exists():
            continue
        try:
            found = path, checkpoint_step(path)
            break
        except Exception as err:  # noqa: BLE001 - torch raises many types for a truncated or foreign file
            reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
            if rank_zero:
                aside = path.with_name(path.name + DAMAGED_SUFFIX)
                os.replace(path, aside)
                damaged.append(f"{path} cannot be read ({reason}; kept as {aside.name})")
            else:
                damaged.append(f"{path} cannot be read ({reason})")
    if damaged and rank_zero:
        then = f"resuming from the previous one, {found[0]} (step {found[1]})" if found else \
            "no earlier checkpoint of this stage: it starts over"
        log.warning("resume: %s; %s", "; ".join(damaged), then)
    return found
