"""Errors that mean "the user asked for something that cannot work", printed as one line; exit codes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

__all__ = [
    "EXIT_NAN",
    "EXIT_OK",
    "EXIT_PEER",
    "EXIT_SAVE",
    "EXIT_STALL",
    "EXIT_USAGE",
    "CheckpointError",
    "CheckpointSaveError",
    "ConfigError",
    "flag_names",
    "param",
]

EXIT_OK, EXIT_SAVE, EXIT_USAGE, EXIT_NAN = 0, 1, 2, 3  # and 128 + signal (130, 143) for a stop signal
EXIT_PEER = 4  # another process of a distributed run died
EXIT_STALL = 5  # no batch came (or a step did not return) for settings.stall_timeout seconds


_flags: dict[str, str] = {}  # setting -> command-line flag, while a command-line layer runs


def param(name: str, value: Any = None) -> str:
    """How a message names the setting ``name`` (with ``value``): ``warmup_epochs``, ``resume='auto'``;
    under :func:`flag_names`, the flag instead: ``--warmup-epochs``, ``--resume auto``."""
    flag = _flags.get(name)
    if flag is None:
        return name if value is None else f"{name}={value!r}"
    return flag if value is None else f"{flag} {value}"


@contextlib.contextmanager
def flag_names(flags: Mapping[str, str]) -> Iterator[None]:
    """Within this block, messages name settings by their command-line flags (see :func:`param`)."""
    saved = dict(_flags)
    _flags.update(flags)
    try:
        yield
    finally:
        _flags.clear()
        _flags.update(saved)


class ConfigError(ValueError):
    """A setting or input that cannot work; the message says what to do instead (see :func:`param`)."""


class CheckpointError(ConfigError):
    """A file that is not a usable checkpoint of this project; the message names the file."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (disk full, permissions); the previous checkpoint is intact."""
