"""A run's files, written whole or not at all: a temp file beside the target, flushed, ``fsync``-ed and
put in place with ``os.replace``, with the permissions the user's umask gives (as ``open`` would),
not ``mkstemp``'s 0600: a team sharing a runs folder reads each other's checkpoints and histories."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_file", "current_umask", "fsync_dir", "write_json_atomic"]


def current_umask() -> int:
    """This process's umask, read without changing it where the system says it (Linux's
    ``/proc/self/status``); elsewhere set and put back at once, as the standard library does."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(directory: str | Path) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be opened: Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", suffix: str = ".part", durable: bool = False) -> Iterator[IO[Any]]:
    """Open a temp file beside ``path`` for writing; on a clean exit move it to ``path`` (flushed and
    ``fsync``-ed first when ``durable``: a checkpoint); on any error remove it, leaving ``path`` as it
    was. The file gets ``0o666 & ~umask``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path``, whole or not at all (:func:`atomic_file`; not ``fsync``-ed:
    a record rewritten every epoch, which a crash before the OS writes it back loses with the epoch)."""
    with atomic_file(path, "w", suffix=".json") as f:
        json.dump(data, f, indent=2, allow_nan=True)
        f.write("\n")
