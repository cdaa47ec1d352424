"""The seed's console lines, now correct: per-batch running means and per-epoch exact means."""

from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine, Events
from tqdm import tqdm

from engine.epoch import batch_in_epoch
from handlers.metrics import TrainMetrics
from handlers.ordering import Stage, attach_ordered, by_iteration, record_period

__all__ = ["ConsoleLogger", "flush_output", "quiet_ignite", "write_line"]


def quiet_ignite() -> None:
    """Ignite's own log lines off (its handlers' INFO lines, "Engine run is terminating due to
    exception"): what a run has to say reaches the user as our lines. Only Ignite's loggers are
    touched: a handler that swallows what reaches the ``ignite`` logger; the loggers that Ignite's
    handlers set up with their own console output (``setup_logger``, which leaves a logger that
    already exists as it is) made beforehand, bare, or, if already made, limited to warnings."""
    ignite_logger = logging.getLogger("ignite")
    if not any(isinstance(h, logging.NullHandler) for h in ignite_logger.handlers):
        ignite_logger.addHandler(logging.NullHandler())
    for name in _IGNITE_CONSOLE_LOGGERS:
        logging.getLogger(name)  # exists now: setup_logger will add no console handler to it
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("ignite.") and isinstance(logger, logging.Logger) and logger.handlers:
            logger.setLevel(logging.WARNING)


_IGNITE_CONSOLE_LOGGERS = ("ignite.handlers.early_stopping.EarlyStopping",
                           "ignite.handlers.terminate_on_nan.TerminateOnNan",
                           "ignite.handlers.time_limit.TimeLimit",
                           "ignite.distributed.launcher.Parallel", "ignite.distributed.auto.auto_model")


def flush_output() -> None:
    """Standard output and error flushed, before the process ends without Python's own teardown."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said there
            pass


def write_line(message: str) -> None:
    """Print one line on rank 0, above any tqdm bar rather than through it. Where the reader is gone (a closed
    terminal after SIGHUP: EIO; a closed pipe: EPIPE) the line is dropped: the run goes on to its checkpoint."""
    if idist.get_rank() == 0:
        try:
            tqdm.write(message, file=sys.stdout)
            sys.stdout.flush()
        except OSError as exc:
            if exc.errno not in (errno.EIO, errno.EPIPE):
                raise


class ConsoleLogger:
    """Prints ``Epoch 1, Batch 50, Train Loss: ..., Train Accuracy: ...%`` every ``log_every`` batches
    (means over the epoch so far) and, after each epoch, the epoch's train and validation lines."""

    def __init__(
        self, train_metrics: TrainMetrics, log_every: int = 50, write: Callable[[str], None] = write_line
    ) -> None:
        if not isinstance(log_every, int) or log_every < 0:
            raise ValueError(f"log_every must be an integer >= 0 (0: no per-batch lines), got {log_every!r}")
        self.train_metrics = train_metrics
        self.log_every = log_every
        self.write = write
        self._by_iteration = False

    def attach(self, trainer: Engine) -> ConsoleLogger:
        if self.log_every:  # one plain handler that looks at the count (cheaper than Ignite's filtered event)
            trainer.add_event_handler(Events.ITERATION_COMPLETED, self._each_iteration)
        self._by_iteration = by_iteration(trainer)
        attach_ordered(trainer, record_period(trainer), self.epoch_lines, Stage.LOGGING)
        return self

    def _each_iteration(self, engine: Engine) -> None:
        if _batch(engine.state) % self.log_every == 0:
            self.batch_line(engine)

    def batch_line(self, engine: Engine) -> None:
        figures = _figures(self.train_metrics.running(), self.train_metrics.prefix, "Train")
        self.write(f"Epoch {engine.state.epoch}, Batch {_batch(engine.state)}, {figures}")

    def epoch_lines(self, engine: Engine) -> None:
        m, e = engine.state.metrics, engine.state.epoch
        if self._by_iteration:  # a validation inside an epoch (the one in progress): its iteration too
            e = f"{e}, Iteration {engine.state.iteration}"
        p = self.train_metrics.prefix
        if p + "loss" in m:
            self.write(f"Epoch {e}, {_figures(m, p, 'Train')}")
        if "val_loss" in m:
            self.write(f"Epoch {e}, {_figures(m, 'val_', 'Val')}")


def _batch(state: Any) -> int:
    """The number of the batch just done within its epoch, from 1 (the epoch's last: its length)."""
    return batch_in_epoch(state) or state.epoch_length


def _figures(metrics: Mapping[str, Any], prefix: str, label: str) -> str:
    """``Train Loss: 0.1234, Train Accuracy: 95.00%`` (accuracy only where there is one)."""
    text = f"{label} Loss: {float(metrics[prefix + 'loss']):.4f}"
    if prefix + "accuracy" in metrics:
        text += f", {label} Accuracy: {float(metrics[prefix + 'accuracy']) * 100:.2f}%"
    return text
