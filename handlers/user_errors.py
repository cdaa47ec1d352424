"""A bug in the user's own code (model, loss, ``Dataset.__getitem__``, a handler) raised during a run:
the traceback of their frames only, then one line of ours (Keras 3's traceback filtering is the model).
``TRAINER_FULL_TRACEBACK=1`` (or ``--full-traceback``) shows the whole traceback instead."""

from __future__ import annotations

import functools
import os
import re
import sys
import sysconfig
import traceback
from pathlib import Path

__all__ = ["FULL_TRACEBACK_ENV", "describe_failure", "full_traceback_wanted", "is_library_file", "report_failure",
           "user_traceback", "where_failed"]

FULL_TRACEBACK_ENV = "TRAINER_FULL_TRACEBACK"
_ROOT = Path(__file__).resolve().parent.parent
_LIBRARY = [str(_ROOT / "engine"), str(_ROOT / "handlers")] + sorted(
    {p for key in ("stdlib", "platstdlib", "purelib", "platlib") if (p := sysconfig.get_paths().get(key))}
)
_WORKER = re.compile(r"Caught \w+ in DataLoader worker process \d+\.\s*\n"
                     r"Original Traceback \(most recent call last\):\n")
_MARKS = re.compile(r"^\s*[~^]+\s*$")
_FRAME = re.compile(r'^  File "([^"]+)", line \d+, in .*$')


def is_library_file(filename: str) -> bool:
    """Frames of Python itself, of installed packages (torch, ignite, ...) and of this library: under
    Python's own folders, or under a folder that packages are installed into wherever it is (one
    holding ``*.dist-info`` folders: ``pip install --target``, ``PYTHONPATH`` to a wheel folder)."""
    if filename.startswith("<") and not filename.startswith(("<string>", "<stdin>", "<ipython")):
        return True  # <frozen importlib._bootstrap> and the like
    path = os.path.abspath(filename)
    if any(path == lib or path.startswith(lib.rstrip(os.sep) + os.sep) for lib in _LIBRARY):
        return True
    return any(_holds_installed_packages(str(folder)) for folder in Path(path).parents)


@functools.lru_cache(maxsize=1024)
def _holds_installed_packages(folder: str) -> bool:
    """Whether ``folder`` is where pip installed packages (it holds a ``<name>-<version>.dist-info``)."""
    try:
        with os.scandir(folder) as entries:
            return any(e.name.endswith(".dist-info") and e.is_dir() for e in entries)
    except OSError:
        return False


def where_failed(exc: BaseException) -> str | None:
    """Where the run was when ``exc`` was raised, as :class:`~handlers.run.Run` recorded it."""
    return getattr(exc, "run_where", None)


def _worker_parts(exc: BaseException) -> tuple[list[str], str] | None:
    """A DataLoader worker's exception carries the worker's traceback as text: its frames and last line."""
    text = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)  # KeyError's str() quotes it
    match = _WORKER.search(text)
    if not match:
        return None
    lines = text[match.end():].rstrip("\n").splitlines()
    frames, i = [], 0
    while i < len(lines):
        found = _FRAME.match(lines[i])
        if found:
            block = [lines[i]]
            while i + 1 < len(lines) and lines[i + 1].startswith("    "):
                i += 1
                if not _MARKS.match(lines[i]):  # Python's ^^^^ under the failing expression
                    block.append(lines[i])
            if not is_library_file(found.group(1)):
                frames.extend(block)
        i += 1
    last = next((line for line in reversed(lines) if line and not line.startswith(" ")), type(exc).__name__)
    return frames, last


def user_traceback(exc: BaseException) -> list[str]:
    """The lines of ``exc``'s traceback that are in the user's files (for a DataLoader worker's error,
    in the worker's own traceback), with Python's heading; no lines when there are none."""
    worker = _worker_parts(exc)
    if worker is not None:
        frames = worker[0]
    else:
        frames = []
        for frame in traceback.extract_tb(exc.__traceback__):
            if not is_library_file(frame.filename):
                frames.append(f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}')
                if frame.line:
                    frames.append(f"    {frame.line.strip()}")
    heading = f"Traceback (most recent call last; your code only, {FULL_TRACEBACK_ENV}=1 shows every frame):"
    return [heading, *frames] if frames else []


def describe_failure(exc: BaseException) -> str:
    """``<exception> (<where>; checkpoints already saved are intact)``: the line after the traceback."""
    worker = _worker_parts(exc)
    what = worker[1] if worker is not None else f"{type(exc).__name__}: {exc}".rstrip(": ")
    what = what.splitlines()[0] if what else type(exc).__name__
    where = where_failed(exc)
    if worker is not None:
        where = f"in a DataLoader worker{', ' + where if where else ''}"
    hint = "" if user_traceback(exc) or full_traceback_wanted() else f"; {FULL_TRACEBACK_ENV}=1 shows where"
    return f"{what} ({where + '; ' if where else ''}checkpoints already saved are intact{hint})"


def full_traceback_wanted() -> bool:
    return os.environ.get(FULL_TRACEBACK_ENV, "").lower() not in ("", "0", "false", "no")


def report_failure(exc: BaseException) -> None:
    """On stderr: the user's frames (every frame when :func:`full_traceback_wanted`), then
    ``error: <exception> (<where>; checkpoints already saved are intact)``."""
    if full_traceback_wanted():
        traceback.print_exception(exc, file=sys.stderr)
    else:
        for line in user_traceback(exc):
            print(line, file=sys.stderr)
    print(f"error: {describe_failure(exc)}", file=sys.stderr, flush=True)
