"""The exceptions reported in one line (`error: ...`, exit 2) as opposed to bugs (full traceback): bad input,
and a training run that diverged (a NaN loss: its message names the step, the last dual values and the
checkpoint kept, which is all a user can act on; a traceback into Lightning's loop adds nothing)."""

from __future__ import annotations

from .config import ConfigError
from .data import DataError
from .module import NonFiniteLossError


class ReportError(ValueError):
    """`umec-report` cannot build the comparison from what it found; the message names the directory or file."""


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, FileNotFoundError, NonFiniteLossError,
                                                ReportError)
