"""One run per output directory: an advisory lock that the kernel drops when the run's process dies.

POSIX systems lock with ``fcntl.flock``; Windows with ``msvcrt.locking`` on the file's first byte
(also dropped by the system when the process ends); a system with neither runs unlocked, and says
so once."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from engine.errors import ConfigError, param

__all__ = ["RunLock"]

_held: set[int] = set()  # descriptors of the locks this process holds

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
try:
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None  # type: ignore[assignment]


def _try_lock(fd: int) -> bool:
    """Take the lock on ``fd`` without waiting: ``False`` when another process holds it."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
    elif msvcrt is not None:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:  # EACCES / EDEADLOCK: another process holds the byte
            return False
    else:
        warnings.warn("this system has neither fcntl nor msvcrt: the output dir is not locked, so two runs "
                      "could write into one folder", RuntimeWarning, stacklevel=3)
    return True


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    elif msvcrt is not None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


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
    """Hold ``<directory>/.lock`` (``flock``; on Windows ``msvcrt.locking``) for the life of a run.

    A second process asking for the same directory is refused with a clear error; a run killed
    with SIGKILL leaves no stuck lock, since the kernel releases ``flock`` locks with the process:
    only the process that took it holds it (forked children close their copy at once, and
    processes it executes never get one: the descriptor is not inheritable).
    """

    def __init__(self, directory: str | Path) -> None:
        self.path = Path(directory) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        if not _try_lock(fd):
            try:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            except OSError:  # Windows: the locked byte cannot be read
                holder = "unknown"
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
            _unlock(self._fd)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
