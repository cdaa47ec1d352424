"""How a run's process ends: every way a user's run can fail turned into one line and an exit code
(:func:`guarded`: 0 done, 1 a save failed or a bug in the user's code, 2 bad input, 130/143 a stop signal
before training), a signal after the run counted (:func:`with_late_signal`), and :func:`exit_process`."""

from __future__ import annotations

import atexit
import gc
import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

from engine.errors import EXIT_SAVE, EXIT_USAGE, CheckpointSaveError, ConfigError
from handlers.console import flush_output
from handlers.signals import LastLines, StopSignal
from handlers.user_errors import report_failure

__all__ = ["exit_process", "guarded", "remember_signals", "with_late_signal"]


def guarded(body: Callable[[], int]) -> int:
    """``body()``, with every way a user's run can fail turned into one line and an exit code."""
    try:
        return body()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CheckpointSaveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_SAVE
    except KeyboardInterrupt as exc:  # before any run of this process had started (then each run answers its own)
        signum = exc.signum if isinstance(exc, StopSignal) else signal.SIGINT
        print(f"Interrupted by {signal.Signals(signum).name} before training started; nothing was saved",
              file=sys.stderr)
        return 128 + signum
    except OSError as exc:  # disk full or read-only outside checkpointing (history, config, events)
        if exc.errno is None:  # an OSError of the user's own code, not of the disk
            report_failure(exc)
            return 1
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}; checkpoints already saved are intact",
              file=sys.stderr)
        return EXIT_SAVE
    except Exception as exc:  # a bug in the user's code (model, loss, data set, handler): their frames, one line
        report_failure(exc)
        return 1


_state: dict[str, LastLines | None] = {"last": None}


def remember_signals(last: LastLines) -> None:
    """The handler that answers stop signals after the run (installed by ``cli.main``), asked at the exit."""
    _state["last"] = last


def with_late_signal(code: int) -> int:
    """A run that ended well but got a stop signal afterwards exits as stopped by it (128 + signal)."""
    last = _state.get("last")
    if code == 0 and last is not None and last.received is not None:
        return 128 + last.received
    return code


def _observed() -> bool:
    """Whether a tracer or profiler watches this process: ``sys.settrace``/``sys.setprofile``, or
    (Python >= 3.12) a tool registered with ``sys.monitoring`` (cProfile, coverage, debuggers)."""
    if sys.gettrace() is not None or sys.getprofile() is not None:
        return True
    monitoring = getattr(sys, "monitoring", None)
    return monitoring is not None and any(monitoring.get_tool(tool) is not None for tool in range(6))


def exit_process(code: int) -> NoReturn:
    """End the process with exit code ``code`` (``sys.exit(cli.main(...))``, without the interpreter's
    teardown of every module: with torch and dynamo loaded that takes about 0.9 s on a 2-core CPU,
    after the run's files are all closed). What an exit does that matters still happens first: a
    garbage collection (finalizers of what is unreachable), the ``atexit`` callbacks (logging,
    tensorboardX writers, multiprocessing children), stdout and stderr flushed. Under a tracer or a
    profiler (coverage, ``python -m cProfile``), which write their results after the script returns,
    it is a plain ``sys.exit``."""
    if _observed():
        sys.exit(code)
    gc.collect()
    atexit._run_exitfuncs()
    code = with_late_signal(code)  # a signal during the teardown (answered by main's handlers) counts too
    flush_output()
    os._exit(code)
