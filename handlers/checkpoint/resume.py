"""The resume: the checkpoint to continue from (``--resume auto``: the newest valid one; or a path), every
process agreeing on it, and the run's objects restored from it, the data order among them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine

from engine.epoch import batch_in_epoch
from engine.errors import ConfigError, param
from handlers.checkpoint.loading import find_resume_checkpoint, restore
from handlers.console import write_line

__all__ = ["data_order", "resume", "resume_point"]


def data_order(train_loader: Iterable, trainer: Engine | None) -> Any | None:
    """The object that holds the training data's order (an ``InMemoryLoader``, a ``StreamLoader``, or the
    loader's ``ResumableRandomSampler``, then attached to ``trainer`` if given); ``None`` if there is none."""
    if hasattr(train_loader, "state_dict") and hasattr(train_loader, "load_state_dict"):
        return train_loader
    sampler = getattr(train_loader, "sampler", None)
    if hasattr(sampler, "state_dict") and hasattr(sampler, "load_state_dict"):
        if trainer is not None and hasattr(sampler, "attach"):
            sampler.attach(trainer, getattr(train_loader, "batch_size", None) or 1)
        return sampler
    return None


def _agree_on(path: Path | None, checkpoints: Path) -> None:
    """Every rank must resume from the same file (or none): else one line, on every rank alike."""
    found = idist.all_gather(str(path.resolve()) if path else "none")
    if len(set(found)) > 1:
        seen = ", ".join(f"rank {r}: {Path(f).name if f != 'none' else 'none'}" for r, f in enumerate(found))
        raise ConfigError(f"the processes found different checkpoints to resume from in {checkpoints} ({seen}): "
                          f"{param('output_dir')} must be one folder that every process sees (a shared filesystem)")


def resume_point(checkpoints: Path, resume: str | None, given: tuple[Path, dict] | None) -> tuple[Path, dict] | None:
    """The checkpoint to continue from and its loaded state: ``given`` (a path's), or with ``resume="auto"``
    the newest valid one in ``checkpoints`` (``None``, said in a line, when there is none: a new run)."""
    if resume != "auto":
        return given
    found = find_resume_checkpoint(checkpoints, log=write_line)
    if found is None:
        write_line(f"No checkpoint in {checkpoints}: starting a new run")
    return found


def resume(checkpoint: Any, to_save: Mapping[str, Any], trainer: Engine, point: tuple[Path, dict] | None, *,
           exact_on_device: bool = True) -> Path | None:
    """Restore ``to_save`` (and ``checkpoint``'s bookkeeping of its files) from ``point`` (see
    :func:`resume_point`); every process must resume from the same file. Says where the run stands; the
    file, or ``None``. ``exact_on_device``: false where a resume cannot be bit-exact (CUDA without
    deterministic kernels): said in a line."""
    if idist.get_world_size() > 1:
        _agree_on(point[0] if point else None, Path(checkpoint.dirname))
    if point is None:
        return None
    path, state = point
    restore(to_save, state, path)
    checkpoint.load_bookkeeping(state, path)
    write_line(f"Resumed from {path} ({_place(trainer.state)})")
    if not exact_on_device:
        write_line(f"Resuming on CUDA without {param('deterministic')}: from here the run can differ in the last bits "
                   f"from an uninterrupted one (CUDA kernels may sum in another order each time); with "
                   f"{param('deterministic')} it is the same run, bit for bit")
    return path


def _place(state: Any) -> str:
    """Where a restored trainer stands, in the words of the epochs it prints: ``epoch 2, 4 of its 8
    batches done, iteration 12`` (Ignite's ``state.epoch`` counts the epochs completed), or ``end of
    epoch 1, iteration 8``."""
    done, length = batch_in_epoch(state), state.epoch_length
    if not done:
        return f"end of epoch {state.epoch}, iteration {state.iteration}"
    of = f" of its {length}" if length else ""
    return f"epoch {state.epoch + 1}, {done}{of} batches done, iteration {state.iteration}"
