"""Crash-safe checkpoints: the best ``n_saved`` by validation score and the latest, and resume.

Ignite's ``Checkpoint`` decides what to keep and names the files; this module adds what it lacks:
``SafeDiskSaver`` writes to a temp file, fsyncs it, renames it and fsyncs the directory, and only
*then* removes the file that rotation dropped (Ignite removes it first, so a kill in between
leaves nothing). No state with a non-finite parameter is ever written.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from torch import nn

from engine.epoch import mid_epoch
from engine.errors import CheckpointSaveError
from engine.files import atomic_file, fsync_dir
from handlers.adapters import checkpoint_items, set_checkpoint_items
from handlers.checkpoint.loading import (
    FORMAT,
    INTEGRITY,
    VERSION,
    find_resume_checkpoint,
    last_checkpoints,
    load_checkpoint,
    restore,
    verify_checkpoint,
)
from handlers.ordering import Stage, attach_ordered, by_iteration, record_period

__all__ = [
    "FORMAT",
    "VERSION",
    "SafeDiskSaver",
    "TrainingCheckpoint",
    "find_resume_checkpoint",
    "last_checkpoints",
    "load_checkpoint",
    "restore",
    "verify_checkpoint",
]



@contextlib.contextmanager
def _crc32_on() -> Iterator[None]:
    """torch's zip writer stores a CRC-32 per record unless switched off globally: our files always have them."""
    get = getattr(torch.serialization, "get_crc32_options", None)
    if get is None:  # a torch without the switch always writes them
        yield
        return
    before = get()
    torch.serialization.set_crc32_options(True)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


class SafeDiskSaver(DiskSaver):
    """Ignite's ``DiskSaver``, made crash-safe: temp file, fsync, ``os.replace``, fsync the directory,
    and removals deferred until the new file is in place. A failed save leaves no temp file."""

    def __init__(self, dirname: str | Path, **kwargs: Any) -> None:
        super().__init__(dirname, atomic=True, create_dir=True, require_empty=False, **kwargs)
        self._pending_removals: list[str] = []

    def _save_func(self, checkpoint: Mapping, path: Path, func: Callable) -> None:
        with atomic_file(path, "wb", suffix=".pt.part", durable=True) as f, _crc32_on():
            func(checkpoint, f, **self.kwargs)
        fsync_dir(Path(self.dirname))
        for name in self._pending_removals:
            if name == Path(path).name:  # the same name saved again (Ignite drops the old item): the new file stays
                continue
            try:
                (Path(self.dirname) / name).unlink()
            except FileNotFoundError:
                pass
        self._pending_removals.clear()

    def remove(self, filename: str) -> None:
        """Called by ``Checkpoint`` before the save: remember, remove after the save succeeded."""
        if idist.get_rank() == self.save_on_rank:
            self._pending_removals.append(filename)


class _Meta:
    """The file's own description: format and version, how it is verified, the watched metric then."""

    def __init__(self, trainer: Engine, metric: str) -> None:
        self.trainer, self.metric = trainer, metric

    def state_dict(self) -> dict[str, Any]:
        score = self.trainer.state.metrics.get(self.metric)
        score = float(score) if isinstance(score, (int, float)) or hasattr(score, "item") else None
        return {"format": FORMAT, "version": VERSION, "integrity": INTEGRITY, "metric": self.metric, "score": score,
                "world_size": idist.get_world_size()}


class _Bookkeeping:
    """The other rotation's list of files, so each file can restore both."""

    def __init__(self) -> None:
        self.checkpoint: Checkpoint | None = None

    def state_dict(self) -> dict[str, Any]:
        saved = checkpoint_items(self.checkpoint) if self.checkpoint is not None else []
        return {"saved": [(p, f) for p, f in saved]}


def _os_error_in(exc: BaseException | None) -> OSError | None:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _check_arguments(to_save: Mapping[str, Any], mode: str, n_saved: int, n_last: int,
                     every_iters: int | None) -> None:  # fmt: skip
    """:class:`TrainingCheckpoint`'s arguments checked: a ``ValueError`` naming the first wrong one."""
    if not isinstance(n_saved, int) or n_saved < 1 or not isinstance(n_last, int) or n_last < 1:
        raise ValueError(f"n_saved and n_last must be integers >= 1, got {n_saved!r}, {n_last!r}")
    if every_iters is not None and (not isinstance(every_iters, int) or every_iters < 1):
        raise ValueError(f"every_iters must be a positive integer or None, got {every_iters!r}")
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    for key in ("model", "trainer"):
        if key not in to_save:
            raise ValueError(f"to_save must hold {key!r}")
    reserved = {"meta", "checkpointer", "other_checkpointer"} & set(to_save)
    if reserved:
        raise ValueError(f"to_save may not use the reserved keys {sorted(reserved)}")


def _best_name(engine: Engine, metric: str) -> str:
    """``epoch=3_val_loss=0.0412``; with validations every N iterations ``epoch=3_iter=1250_val_loss=0.0412``."""
    where = f"epoch={engine.state.epoch}"
    if by_iteration(engine):
        where += f"_iter={engine.state.iteration}"
    return f"{where}_{metric}={_shown(engine, metric)}"


def _shown(engine: Engine, metric: str) -> str:
    """The watched metric's value as a best checkpoint's name shows it (four decimals, its own sign)."""
    return f"{float(engine.state.metrics[metric]):.4f}"


def _all_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


class TrainingCheckpoint:
    """Saves ``to_save`` into ``dirname``: ``best_epoch=E_<metric>=S.pt`` (``best_epoch=E_iter=I_...`` when the run
    validates every N iterations; the ``n_saved`` best by
    ``metric``) and ``last_iter=I.pt`` (the ``n_last`` latest), at each epoch end (Stage.CHECKPOINT)
    and, with ``every_iters``, every that many iterations in between (for exact mid-epoch resume).

    ``to_save`` maps names to objects with ``state_dict``; it must hold ``"model"`` and ``"trainer"``.
    Each file also holds the rotation bookkeeping and a format marker, and loads with
    ``torch.load(path, weights_only=True)``. ``skip_if`` (e.g. a tripped NaN guard) vetoes a save.
    With ``mode="min"`` the lowest score is best (Ignite keeps the files of highest priority: the score
    negated); the name shows the score as it is (``best_epoch=5_val_loss=0.1545.pt``). Older runs'
    files, named by the negated score, are read and rotated alike (the bookkeeping keeps the priorities).
    """

    def __init__(
        self,
        dirname: str | Path,
        to_save: Mapping[str, Any],
        *,
        metric: str = "val_accuracy",
        mode: str = "max",
        n_saved: int = 2,
        n_last: int = 2,
        every_iters: int | None = None,
        skip_if: Callable[[], bool] | None = None,
    ) -> None:
        _check_arguments(to_save, mode, n_saved, n_last, every_iters)
        self.dirname = Path(dirname)
        self.metric = metric
        self.mode = mode
        self.every_iters = every_iters
        self.model: nn.Module = to_save["model"]
        self.trainer: Engine = to_save["trainer"]
        self.skip_if = skip_if
        # called with the trainer just before each save: what was logged up to here goes to disk first
        self.before_save: list[Callable[[Engine], None]] = []
        self.saver = SafeDiskSaver(self.dirname)
        base = {**to_save, "meta": _Meta(self.trainer, metric)}
        other_of_best, other_of_last = _Bookkeeping(), _Bookkeeping()
        score = Checkpoint.get_default_score_fn(metric, 1.0 if mode == "max" else -1.0)
        self.best = Checkpoint(
            {**base, "other_checkpointer": other_of_best},
            self.saver,
            filename_prefix="best",
            score_function=lambda engine: float(score(engine)),
            score_name=metric,
            n_saved=n_saved,
            # the name shows the metric as it is: Ignite's {score} is the priority, negated for mode="min"
            global_step_transform=lambda engine, _: _best_name(engine, metric),
            filename_pattern="{filename_prefix}_{global_step}.{ext}",
            include_self=True,
        )
        self.last = Checkpoint(
            {**base, "other_checkpointer": other_of_last},
            self.saver,
            filename_prefix="last",
            n_saved=n_last,
            global_step_transform=lambda engine, _: engine.state.iteration,
            filename_pattern="{filename_prefix}_iter={global_step}.{ext}",
            include_self=True,
        )
        other_of_best.checkpoint, other_of_last.checkpoint = self.last, self.best
        if idist.get_rank() == 0:
            for stale in self.dirname.glob(".tmp-*.pt.part"):  # left by a process killed while saving
                stale.unlink(missing_ok=True)

    def attach(self, trainer: Engine) -> TrainingCheckpoint:
        """Save best and last at each record period (Stage.CHECKPOINT: each epoch's end, or each validation of a
        run validating every N iterations, which saves ``last`` at epoch ends too) and ``last`` every
        ``every_iters`` iterations."""
        attach_ordered(trainer, record_period(trainer), self, Stage.CHECKPOINT)
        if by_iteration(trainer):
            attach_ordered(trainer, Events.EPOCH_COMPLETED, self._save_last, Stage.CHECKPOINT)
        if self.every_iters:
            trainer.add_event_handler(Events.ITERATION_COMPLETED(every=self.every_iters), self._save_mid_epoch)
        return self

    def saved_at(self, iteration: int) -> bool:
        """Whether the newest ``last`` file is this iteration's."""
        last = self.last_path
        return last is not None and last.name == f"last_iter={iteration}.pt"

    def _save_last(self, engine: Engine) -> None:
        if not self.saved_at(engine.state.iteration):  # not saved at this validation already
            self.save(engine, best=False)

    def _save_mid_epoch(self, engine: Engine) -> None:
        if mid_epoch(engine.state):  # epoch ends save anyway
            self.save(engine, best=False)

    def __call__(self, engine: Engine) -> None:
        self.save(engine, best=True)

    def save(self, engine: Engine, best: bool = True) -> None:
        """Save ``last`` (and ``best``, when ``best`` and the score is finite and among the top)."""
        if self.skip_if is not None and self.skip_if():
            return
        if not _all_finite(self.model):
            return
        for hook in self.before_save:
            hook(engine)
        score = engine.state.metrics.get(self.metric)
        previous = self.last_path
        try:
            if best and score is not None and math.isfinite(float(score)):
                self.best(engine)
            self.last(engine)
        except (OSError, RuntimeError) as exc:
            cause = _os_error_in(exc)  # torch's zip writer wraps a failed write in a RuntimeError
            if cause is None:
                raise
            kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
            raise CheckpointSaveError(
                f"could not write a checkpoint in {self.dirname} ({cause.strerror or cause}); {kept}"
            ) from None

    @property
    def best_path(self) -> Path | None:
        """The best file kept so far; on a tie the first epoch's (as Keras and Lightning keep it, and as
        the history's best row is: Ignite keeps equal scores in the order they were saved)."""
        items = checkpoint_items(self.best)
        if not items:
            return None
        top = items[-1].priority
        return self.dirname / next(i for i in items if i.priority == top).filename

    @property
    def last_path(self) -> Path | None:
        """The newest ``last`` file."""
        last = self.last.last_checkpoint
        return self.dirname / Path(last).name if last is not None else None

    def load_bookkeeping(self, checkpoint: Mapping[str, Any], path: Path) -> None:
        """Restore both rotations from a file written by this class; forget files no longer there."""
        own, other = checkpoint.get("checkpointer"), checkpoint.get("other_checkpointer")
        if own is None or other is None:
            return
        mine, theirs = (self.last, self.best) if path.name.startswith("last_") else (self.best, self.last)
        mine.load_state_dict(own)
        set_checkpoint_items(theirs, [(p, f) for p, f in other["saved"]])
        for ckpt in (self.best, self.last):
            set_checkpoint_items(ckpt, [i for i in checkpoint_items(ckpt) if (self.dirname / i.filename).exists()])
