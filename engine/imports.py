"""Importing torch, Ignite and this package without the cyclic garbage collector rescanning them.

Importing torch, Ignite and their dependencies creates about 300,000 objects that live as long as
the process. While they are being created, CPython's collector runs a full collection each time
the heap has grown by a quarter, over every object so far: six of them (30-200 ms each, 0.7 s in
all) in the default MNIST run on a 2-core EPYC, and another 0.2 s at the exit's collection.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def frozen_imports() -> Iterator[None]:
    """Run the imports inside with the collector paused, then ``gc.freeze()`` everything alive.

    Frozen objects are left out of every later collection (and forked DataLoader workers do not
    touch their pages to scan them); they are still freed by reference counting as usual, so
    all that can no longer be collected is a reference cycle that was already garbage when the
    block ended (a few dozen objects from the imports). The collector's state is restored after:
    a process that disabled it keeps it disabled.
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if collecting:
            gc.enable()
