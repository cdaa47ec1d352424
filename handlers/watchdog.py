"""A stall watchdog: when the run makes no progress for ``timeout`` seconds (no batch arrives from a loader,
or a step or a handler never returns: a deadlocked collective), one line names where it stopped (the
epoch, the iteration, the loader, the worker and the sample it was fetching where that can be known), its
DataLoader workers are ended, and the process exits with :data:`~engine.errors.EXIT_STALL`; every
checkpoint already written is kept (saves are atomic).

It costs nothing per iteration: a thread wakes every second or so and compares what Ignite records
anyway (each engine's iteration and the last event it fired) with what it saw before. A slow loader
that still delivers batches, however slowly, is never stopped: each batch is progress.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from ignite.engine import Engine, Events

from engine.errors import EXIT_STALL, param
from handlers.adapters import waiting_on_worker
from handlers.console import flush_output
from handlers.user_errors import is_library_file

__all__ = ["StallWatchdog"]

_STEP = (Events.GET_BATCH_COMPLETED, Events.ITERATION_STARTED)


def _say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except (OSError, ValueError):  # the terminal is gone
        pass


def _end_process(code: int) -> None:
    """End this process now, its DataLoader workers first (they would otherwise notice only seconds later)."""
    for child in multiprocessing.active_children():
        child.kill()
    for child in multiprocessing.active_children():
        child.join(timeout=2)
    flush_output()
    os._exit(code)


class StallWatchdog:
    """Watch ``trainer`` (and ``evaluator``, while it validates) for ``timeout`` seconds without progress.

    Args:
        timeout: seconds without a new batch, a new iteration or a new event; ``0`` switches it off.
        kept: the newest checkpoint (named in the line), e.g. ``lambda: checkpoint.last_path``.
        poll: how often the thread looks (default: ``min(1, timeout / 4)`` seconds).
        on_stall: called with the exit code after the line (default: end the process, workers first).
    """

    def __init__(self, timeout: float, kept: Callable[[], Path | None] = lambda: None, poll: float | None = None,
                 log: Callable[[str], None] = _say, on_stall: Callable[[int], None] = _end_process) -> None:
        if not isinstance(timeout, (int, float)) or timeout < 0:
            raise ValueError(f"timeout must be a number of seconds >= 0 (0: off), got {timeout!r}")
        self.timeout, self.kept, self.log, self.on_stall = float(timeout), kept, log, on_stall
        self.poll = poll if poll is not None else min(1.0, self.timeout / 4)
        self.trainer: Engine | None = None
        self.evaluator: Engine | None = None
        self.stalled: str | None = None  # the line, once said
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._main = threading.main_thread().ident

    def attach(self, trainer: Engine, evaluator: Engine | None = None) -> StallWatchdog:
        """Start watching when the trainer starts; :meth:`stop` (the run's ``close``) ends it."""
        self.trainer, self.evaluator = trainer, evaluator
        if self.timeout:
            trainer.add_event_handler(Events.STARTED, self.start)
        return self

    def start(self, engine: Engine | None = None) -> None:
        if self._thread is None:
            self._main = threading.get_ident()
            self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _progress(self) -> tuple:
        t, e = self.trainer, self.evaluator
        seen = (t.state.epoch, t.state.iteration, t.last_event_name)
        return seen + ((e.state.iteration, e.last_event_name) if e is not None else ())

    def _watch(self) -> None:
        last, since = self._progress(), time.monotonic()
        while not self._stop.wait(self.poll):
            now = self._progress()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= self.timeout:
                self.stalled = self.describe(time.monotonic() - since)
                self.log(self.stalled)
                self.on_stall(EXIT_STALL)
                return

    def describe(self, waited: float) -> str:
        """The line: what stalled, where, for how long, what is kept and how to go on."""
        t, e = self.trainer, self.evaluator
        where = f"epoch {t.state.epoch}, iteration {t.state.iteration + 1}"
        validating = e is not None and t.last_event_name == Events.EPOCH_COMPLETED and e.state.iteration is not None \
            and e.last_event_name not in (None, Events.COMPLETED)  # fmt: skip
        if t.last_event_name == Events.GET_BATCH_STARTED:
            what = f"no batch came from the training loader {self._fetching(t)}"
        elif validating and e.last_event_name == Events.GET_BATCH_STARTED:
            what = f"no batch came from the validation loader {self._fetching(e)}"
            where += f" (validation batch {e.state.iteration + 1})"
        elif t.last_event_name in _STEP:
            what = ("the training step did not return (the forward, backward or optimizer step; in a distributed run "
                    "a collective that another process never joined)")
        else:
            name = getattr(t.last_event_name, "name", str(t.last_event_name))
            what = f"a handler of the trainer's {name} did not return{self._main_frame_where()}"
        kept = self.kept()
        saved = f"the newest checkpoint {kept} is kept" if kept is not None else "no checkpoint had been written"
        return (f"error: stalled at {where}: {what} for {waited:.0f} s ({param('stall_timeout')} "
                f"{self.timeout:g}); {saved}: continue with {param('resume', 'auto')} once it is fixed")

    def _fetching(self, engine: Engine) -> str:
        worker = waiting_on_worker(engine)
        if worker is not None:
            number, pid = worker
            return f"(its worker {number}{f', pid {pid},' if pid else ''} never delivered the batch)"
        return f"(in this process{self._main_frame_where()})"

    def _main_frame_where(self) -> str:
        """Where the main thread is stuck, in the user's code: ``__getitem__(17) at data.py:40``."""
        frame = sys._current_frames().get(self._main)
        found = _user_frame(frame)
        if found is None:
            return ""
        name, index, location = found
        return f": {name}({index!r}) at {location}" if index is not None else f": {name} at {location}"


def _user_frame(frame: FrameType | None) -> tuple[str, Any, str] | None:
    """The innermost frame of a dataset's ``__getitem__`` or ``__iter__`` (or else the innermost frame outside
    Python's, torch's, Ignite's and our own files), with the index it was asked for."""
    fallback = None
    while frame is not None:
        code = frame.f_code
        if not is_library_file(code.co_filename):
            index = None
            if code.co_name == "__getitem__" and code.co_argcount >= 2:
                index = frame.f_locals.get(code.co_varnames[1])
            location = f"{code.co_filename}:{frame.f_lineno}"
            if code.co_name in ("__getitem__", "__getitems__", "__iter__", "__next__"):
                return code.co_name, index, location
            fallback = fallback or (code.co_name, None, location)
        frame = frame.f_back
    return fallback
