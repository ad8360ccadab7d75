"""The run's CSV log, kept across a resume.

Lightning's CSVLogger deletes `metrics.csv` when its folder is not empty (a fresh experiment), so a resumed run
rewrote the file from its own rows alone: the first part's pretrain curve and finished compress epochs were gone.
`RunCSVLogger` never deletes it: the resumed run appends, and where the resumed stage's first part logged past
its resume point (the steps the resumed run trains again) those rows are dropped once, by `drop_rows_after`, so
each step is in the file once. A new column rewrites the file through a temporary file (atomically), as Lightning's
rewrite in place could lose it on a full disk.
"""

from __future__ import annotations

import csv
import io
import logging
import os

from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from .io import write_text

log = logging.getLogger(__name__)


class _KeepingWriter(ExperimentWriter):
    """Lightning's writer that appends to an existing `metrics.csv` (its header becomes the known columns)."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as file:
                self.metrics_keys = list(next(csv.reader(file), []))

    def _check_log_dir_exists(self) -> None:
        pass  # Lightning deletes metrics.csv here

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as file:
            rows = list(csv.DictReader(file))
        write_rows(self.metrics_file_path, fieldnames, rows)


def write_rows(path: str, fieldnames: list[str], rows: list[dict]) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fieldnames)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())


class RunCSVLogger(CSVLogger):
    """`CSVLogger` whose `metrics.csv` survives a resume (module docstring)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _KeepingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment

    def drop_rows_after(self, phase: str, step: int) -> int:
        """Drop the rows of stage `phase` (its columns are `<phase>/...`) logged after `step`: what a resume from a
        checkpoint of that step trains and logs again. Returns how many were dropped."""
        writer = self.experiment
        if not isinstance(writer, _KeepingWriter):  # a process other than rank 0: it writes no file
            return 0
        writer.save()  # rows still in memory first
        path = writer.metrics_file_path
        if not os.path.isfile(path):
            return 0
        with open(path, newline="") as file:
            reader = csv.DictReader(file)
            fieldnames, rows = list(reader.fieldnames or []), list(reader)

        def replayed(row: dict) -> bool:
            mine = any(value not in ("", None) and key.startswith(f"{phase}/") for key, value in row.items())
            try:
                return mine and int(float(row.get("step") or 0)) > step
            except ValueError:
                return False

        kept = [row for row in rows if not replayed(row)]
        if len(kept) < len(rows):
            write_rows(path, fieldnames, kept)
            log.info("%s: %d rows of stage %s after step %d dropped (the resumed run logs those steps again)",
                     path, len(rows) - len(kept), phase, step)
        return len(rows) - len(kept)
