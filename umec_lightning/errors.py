"""The exceptions that mean "bad input" (reported in one line) as opposed to bugs (full traceback)."""

from __future__ import annotations

from .config import ConfigError
from .data import DataError

USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, FileNotFoundError)
