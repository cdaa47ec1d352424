"""One run per output directory: an advisory lock that the kernel drops when the run's process dies."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from engine.errors import ConfigError, param

__all__ = ["RunLock"]

_held: set[int] = set()  # descriptors of the locks this process holds


def _let_go_in_child() -> None:
    """In a child just forked (a DataLoader worker, a forked rank): close its copies of the locks'
    descriptors. A ``flock`` belongs to the open file, which a fork shares: a worker still alive after
    its run's process was killed would otherwise keep the folder locked until its watchdog ends it
    (5 to 8 s), and refuse the restart that came at once."""
    for fd in _held:
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_let_go_in_child)


class RunLock:
    """Hold ``<directory>/.lock`` (``flock``) for the life of a run.

    A second process asking for the same directory is refused with a clear error; a run killed
    with SIGKILL leaves no stuck lock, since the kernel releases ``flock`` locks with the process:
    only the process that took it holds it (forked children close their copy at once, and
    processes it executes never get one: the descriptor is not inheritable).
    """

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"output dir {self.path.parent} is in use by another run (pid {holder}): wait for it to end, "
                f"or choose another {param('output_dir')}"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        _held.add(fd)
        return self

    def release(self) -> None:
        if self._fd is not None:
            _held.discard(self._fd)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
