"""DataLoader workers beside a CUDA context: forked, and never touching what they inherited.

Workers are started by ``fork`` on Linux (the default we keep): they begin with the data set
already in memory, whatever it holds (lambdas, open files, objects that cannot be pickled), and a
worker is up in milliseconds instead of the seconds a ``spawn`` or ``forkserver`` worker takes
to import torch again. A forked process must never use CUDA, and ours do not: they only fetch and
collate on the CPU. What could still reach CUDA from a worker is the main process's garbage: a
reference cycle holding CUDA tensors (an old batch, an exception's frames) that was not collected
before the fork would be collected in the worker, and its tensors' frees would run in a process
where CUDA cannot run (an abort). So right after every fork the child freezes what it inherited
(``gc.freeze``): its collector never looks at those objects, it only collects what it makes
itself (the same trick also spares the pages of everything inherited from being written to by
the collector's scans). Users who want another start method set it as usual
(``torch.multiprocessing.set_start_method("spawn")``); the loaders follow it.

A worker also stays quiet when its run is killed under it: a batch's tensors reach the main process
through a file descriptor that the worker's ``multiprocessing.resource_sharer`` thread hands over; a
main process killed in that hand-over leaves the thread a ``ConnectionResetError``, which it would
print as a traceback under the run's last lines. Such an error, in that thread, once the worker's
parent is gone, is dropped; any other goes to the usual hook.
"""

from __future__ import annotations

import gc
import os
import sys
import time
from types import TracebackType

__all__ = ["freeze_inherited", "quiet_when_orphaned"]

_parent: dict[str, object] = {"pid": None, "hook": sys.excepthook}


def freeze_inherited() -> None:
    """In a freshly forked child: every object inherited from the parent out of the collector's reach; and
    :func:`quiet_when_orphaned` as its ``sys.excepthook``."""
    gc.freeze()
    _parent.update(pid=os.getppid(), hook=sys.excepthook)
    sys.excepthook = quiet_when_orphaned


def quiet_when_orphaned(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    """``sys.excepthook`` of a forked child: a connection error of the resource sharer's thread (its
    ``_serve`` reports through ``sys.excepthook``) is dropped once the parent has died (waiting up to a
    second for the kernel to say so); everything else goes to the hook it had."""
    if isinstance(value, (ConnectionError, EOFError)) and _raised_in_resource_sharer(tb) and _parent_gone():
        return
    _parent["hook"](kind, value, tb)  # type: ignore[operator]


def _raised_in_resource_sharer(tb: TracebackType | None) -> bool:
    while tb is not None:
        if tb.tb_frame.f_code.co_filename.endswith(os.path.join("multiprocessing", "resource_sharer.py")):
            return True
        tb = tb.tb_next
    return False


def _parent_gone(wait: float = 1.0) -> bool:
    deadline = time.monotonic() + wait
    while True:
        if _parent["pid"] is not None and os.getppid() != _parent["pid"]:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=freeze_inherited)
