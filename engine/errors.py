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

EXIT_OK = 0
"""The run finished, also when early stopping ended it."""
EXIT_SAVE = 1
"""A bug in the user's code, or a checkpoint that could not be written."""
EXIT_USAGE = 2
"""A bad flag, setting, data set or checkpoint: one line says which (as argparse's own exit code)."""
EXIT_NAN = 3
"""The loss became NaN or infinite."""
EXIT_PEER = 4
"""Another process of a distributed run died."""
EXIT_STALL = 5
"""No batch came, or a step did not return, for ``settings.stall_timeout`` seconds."""
# and 128 + the signal (130 SIGINT, 143 SIGTERM, 129 SIGHUP) for a stop signal


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
