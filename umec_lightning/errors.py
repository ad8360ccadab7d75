"""The exceptions reported in one line (`error: ...`, exit 2) as opposed to bugs (full traceback): bad input,
a training run that diverged (a NaN loss: its message names the step, the last dual values and the
checkpoint kept, which is all a user can act on; a traceback into Lightning's loop adds nothing), and a full
disk (the file and the bytes it needs; the file it would have replaced is intact)."""

from __future__ import annotations

from .config import ConfigError
from .data import DataError
from .io import DiskFullError
from .module import NonFiniteLossError


class ReportError(ValueError):
    """`umec-report` cannot build the comparison from what it found; the message names the directory or file."""


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, DiskFullError, FileNotFoundError,
                                                NonFiniteLossError, ReportError)
