"""One line after the first epoch when the training waited on its data loading in the main process."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from ignite.engine import Engine, Events

from engine.errors import param

__all__ = ["DataWaitHint"]


class DataWaitHint:
    """After the first epoch this process completes: if fetching samples in the main process
    (``num_workers=0``) took at least ``share`` of it, and ``min_seconds`` (workers take a second or
    so to start: a short wait is not worth them), one line saying how much and that workers
    would load the next batches while the model trains (the batches stay the same: their draws do
    not depend on the workers). Nothing is measured per iteration: the dataset counts its own
    ``fetch_seconds`` (:class:`engine.seeding.SeededDataset`) and Ignite its epoch's time.

    Args:
        dataset: what the training loader fetches from, with a ``fetch_seconds`` count.
        share: the part of the epoch from which the line is said.
        min_seconds: the least wait said (default ``MIN_SECONDS``, 2 s).
        log: where the line goes.
        cores: CPU cores this process may use (default: its affinity, else ``os.cpu_count()``).
    """

    MIN_SECONDS = 2.0  # the default of min_seconds

    def __init__(self, dataset: Any, share: float = 0.3, min_seconds: float | None = None,
                 log: Callable[[str], None] = print, cores: int | None = None) -> None:  # fmt: skip
        min_seconds = self.MIN_SECONDS if min_seconds is None else min_seconds
        if not 0 < share <= 1:
            raise ValueError(f"share must be in (0, 1], got {share!r}")
        if not min_seconds >= 0:
            raise ValueError(f"min_seconds must be >= 0, got {min_seconds!r}")
        self.dataset, self.share, self.min_seconds, self.log = dataset, share, min_seconds, log
        affinity = getattr(os, "sched_getaffinity", None)  # (not on macOS)
        self.cores = cores if cores is not None else len(affinity(0)) if affinity else os.cpu_count() or 1
        self._start = 0.0

    def attach(self, trainer: Engine) -> DataWaitHint:
        trainer.add_event_handler(Events.STARTED, self._started)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self._completed)
        return self

    def _started(self, engine: Engine) -> None:
        self._start = self.dataset.fetch_seconds  # not the checks' and the LR finder's fetches before

    def _completed(self, engine: Engine) -> None:
        engine.remove_event_handler(self._completed, Events.EPOCH_COMPLETED)
        epoch = engine.state.times.get(Events.EPOCH_COMPLETED.name) or 0.0
        waited = self.dataset.fetch_seconds - self._start
        if epoch <= 0 or waited < max(self.share * epoch, self.min_seconds) or self.cores < 2:
            return
        workers = min(self.cores, 8)
        self.log(f"Loading samples took {waited / epoch:.0%} of epoch {engine.state.epoch} ({waited:.1f} of "
                 f"{epoch:.1f} s) in the training process: {param('num_workers', workers)} would load the next "
                 f"batches while the model trains (the same batches: their draws do not depend on the workers)")
