"""The per-epoch record of a run, kept in checkpoints and written to ``history.json``."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine, Events

from engine.files import write_json_atomic
from handlers.ordering import Stage, attach_ordered, by_iteration, record_period

__all__ = ["History"]


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep it readable
    return value


class History:
    """One dict per completed epoch: the trainer's metrics plus ``epoch``, ``lr``, ``epoch_seconds``
    (wall time of the epoch, validation included), ``samples_per_second`` (training phase only) and
    whatever ``extra`` callables return.

    Recorded at Stage.RECORD (so the epoch is in the checkpoint written after it); written to
    ``path`` at Stage.PUBLISH, before that checkpoint. ``state_dict()`` carries the list, so a resumed run keeps the
    epochs before the checkpoint, and only those.
    """

    def __init__(self, path: str | Path | None, extra: Mapping[str, Callable[[], Any]] | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self.extra = dict(extra or {})
        self.epochs: list[dict[str, Any]] = []
        self._epoch_start = 0.0
        self._epoch_samples = 0
        self._train_seconds = 0.0
        self._by_iteration = False

    def attach(self, trainer: Engine) -> History:
        """A row at each record period (:func:`~handlers.ordering.run_period`): each epoch's end, or each
        validation of a run validating every N iterations (then its time and samples are the period's)."""
        period = record_period(trainer)
        self._by_iteration = by_iteration(trainer)
        trainer.add_event_handler(Events.STARTED if self._by_iteration else Events.EPOCH_STARTED, self._start_epoch)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._count)
        attach_ordered(trainer, period, self._end_training_phase, Stage.METRICS)
        attach_ordered(trainer, period, self.record, Stage.RECORD)
        attach_ordered(trainer, period, self.write, Stage.PUBLISH)
        return self

    def _start_epoch(self, engine: Engine) -> None:
        self._epoch_start = time.perf_counter()
        self._epoch_samples = 0

    def _end_training_phase(self, engine: Engine) -> None:
        self._train_seconds = time.perf_counter() - self._epoch_start

    def _count(self, engine: Engine) -> None:
        self._epoch_samples += engine.state.output["batch_size"]

    def record(self, engine: Engine) -> None:
        seconds = time.perf_counter() - self._epoch_start
        row: dict[str, Any] = {"epoch": engine.state.epoch, "iteration": engine.state.iteration}
        row.update({k: _plain(v) for k, v in engine.state.metrics.items()})
        row.update({k: _plain(fn()) for k, fn in self.extra.items()})
        row["epoch_seconds"] = round(seconds, 4)
        train_seconds = self._train_seconds
        row["samples_per_second"] = round(self._epoch_samples / train_seconds, 1) if train_seconds > 0 else None
        self.epochs = [r for r in self.epochs if r.get("iteration", 0) < row["iteration"]] + [row]
        if self._by_iteration:  # the next row's time and samples count from here
            self._start_epoch(engine)

    def write(self, engine: Engine | None = None) -> None:
        """Write history.json (rank 0 only)."""
        if self.path is not None and idist.get_rank() == 0:
            write_json_atomic(self.path, self.epochs)

    def best(self, metric: str = "val_accuracy", mode: str = "max") -> dict[str, Any] | None:
        """The epoch with the best finite ``metric``: highest with ``mode="max"``, lowest with ``"min"``."""
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        rows = [r for r in self.epochs if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
        pick = max if mode == "max" else min
        return pick(rows, key=lambda r: r[metric]) if rows else None

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": [dict(r) for r in self.epochs]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epochs = [dict(r) for r in state["epochs"]]
