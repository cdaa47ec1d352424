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
"""

from __future__ import annotations

import gc
import os

__all__ = ["freeze_inherited"]


def freeze_inherited() -> None:
    """In a freshly forked child: every object inherited from the parent out of the collector's reach."""
    gc.freeze()


if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=freeze_inherited)
