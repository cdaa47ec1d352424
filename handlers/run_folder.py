"""The run folder: where a run writes (``--output-dir``, default ``runs/<name>-<timestamp>``), checked before
anything else; an existing run there is never overwritten unless resumed, and what a run that died before
its first checkpoint left is cleared."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Any

from engine.errors import ConfigError, param
from handlers.console import write_line

__all__ = ["check_output_dir", "clear_failed_start", "failed_start", "make_output_dir", "saved_config"]


def check_output_dir(output_dir: str | Path | None, resume: str | None, name: str = "run") -> Path:
    """The run folder (default ``runs/<name>-<timestamp>``); an existing run there is never
    overwritten unless resumed."""
    out = Path(output_dir or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        if out.exists() and not out.is_dir():
            raise ConfigError(f"{param('output_dir')} {out} is a file, not a folder")
        holds_files = out.exists() and any(out.iterdir())
    except OSError as exc:
        raise ConfigError(f"{param('output_dir')} {out} cannot be read: {_why_not(out, exc)}; choose another "
                          f"{param('output_dir')}") from None
    if resume is None and holds_files and not failed_start(out):
        raise ConfigError(f"output dir {out} already holds a run: pass {param('resume', 'auto')} to continue it, "
                          f"or choose another {param('output_dir')}")
    return out


def make_output_dir(out: Path) -> None:
    """Make the run folder and check that it can be written (a file made and removed), before anything
    else: a failure is one line naming the setting (a :class:`ConfigError`, exit 2), not an error
    of the run's first write."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{param('output_dir')} {out} cannot be made or written: {_why_not(out, exc)}; choose "
                          f"another {param('output_dir')}") from None


def _why_not(out: Path, exc: OSError) -> str:
    if exc.errno == errno.ENOTDIR:
        blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
        return f"{blocking} is a file, not a folder" if blocking is not None else "a part of it is not a folder"
    if exc.errno in (errno.EACCES, errno.EPERM):
        where = str(exc.filename or out)
        return "permission denied" if where == str(out) else f"permission denied on {where}"
    if exc.errno == errno.EROFS:
        return "its file system is read-only"
    if exc.errno == errno.ENOSPC:
        return "no space is left on its disk"
    return exc.strerror or str(exc)


def failed_start(out: Path) -> bool:
    """Whether ``out`` holds a run of ours that ended before its first checkpoint (its ``config.json``
    and no ``checkpoints/*.pt``): nothing there to continue, so the same command may start afresh in it."""
    started = (out / "config.json").is_file() or (out / "lr_finder.json").is_file()
    return started and not any((out / "checkpoints").glob("*.pt"))


def clear_failed_start(out: Path) -> None:
    """Remove what a run that died before its first save left (config, history, TensorBoard events,
    half-written files), so that the new run's records are not mixed with them; say so in one line."""
    stale = [out / "config.json", out / "history.json", *(out / "tb").glob("events.out.tfevents.*"),
             *(out / "checkpoints").glob(".tmp-*")]  # fmt: skip
    for path in stale:
        path.unlink(missing_ok=True)
    write_line(f"{out} holds no checkpoint (the run there ended before its first save): starting afresh in it")


def saved_config(out: str | Path | None) -> dict[str, Any] | None:
    """The ``config.json`` of the run in ``out`` (what it was started with), or ``None`` if there is none."""
    path = Path(out or "") / "config.json"
    if not out or not path.is_file():
        return None
    return json.loads(path.read_text())
