"""TensorBoard logging through Ignite's ``TensorboardLogger`` (tensorboardX underneath).

Tags, grouped so TensorBoard's cards read well:

- step = iteration: ``loss/train_step`` (batch loss), ``lr``, ``grad_norm``, every ``log_every`` iterations;
- step = epoch: ``loss/train``, ``loss/val``, ``accuracy/train``, ``accuracy/val``,
  ``time/epoch_seconds``, ``time/samples_per_second``;
- everything is in the file when an epoch's logging returns (see :meth:`TensorBoardLogging.flush`);
- images after the last validation of the run (and every ``images_every`` epochs if set; drawing
  and encoding them costs about 45 ms): ``val/confusion_matrix`` (up to 50 classes; beyond, the text
  ``val/most_confused``: the most frequent mistakes and the classes with the lowest recall, in time
  linear in the mistakes, whatever the number of classes), ``val/misclassified``;
- once the run ends: hparams (the resolved config) with ``hparam/best_val_accuracy`` and
  ``hparam/final_val_accuracy``, in the ``hparams`` sub-run.

On resume, everything logged after the checkpoint's iteration is purged (``purge_step``), so no
step appears twice. Events are flushed every ``flush_secs`` seconds and, completely, at each epoch end.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import TensorboardLogger
from ignite.handlers.tensorboard_logger import GradsHistHandler, WeightsHistHandler
from torch import nn

from handlers.adapters import add_hparams_fast, add_image_fast, add_scalars_fast, flush_tensorboardx, queue_in_thread
from handlers.confusion import PICTURE_CLASSES, MisclassifiedCollector, confusion_table
from handlers.history import History
from handlers.images import confusion_matrix_image, labelled_grid
from handlers.ordering import Stage, attach_ordered, by_iteration, last_iteration, record_period

__all__ = ["TensorBoardLogging", "MisclassifiedCollector"]

EPOCH_TAGS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "train_accuracy": "accuracy/train",
    "val_accuracy": "accuracy/val",
    "epoch_seconds": "time/epoch_seconds",
    "samples_per_second": "time/samples_per_second",
}

_ROW_KEYS = {"epoch", "iteration", "lr"}


class TensorBoardLogging:
    """Writes the scalars, images and hparams above into ``log_dir``.

    Args:
        log_dir: the run's ``tb/`` folder.
        log_every: iterations between per-iteration scalars (0: none).
        lr: callable giving the current learning rate.
        collector: a :class:`MisclassifiedCollector` attached to the evaluator (classification: the
            confusion matrix and misclassified samples of the validations), or ``None``. In a
            distributed run it must be attached on every rank (it sums over them), this logger on rank 0.
        model: for weight and gradient histograms when ``histograms`` (they cost time).
        purge_step: on resume, the first iteration to keep from the new run (checkpoint iteration + 1).
        history: the run's :class:`History`, whose row for the epoch gives time and throughput.
        images_every: also write the images after validations of epochs divisible by this (0: last only).
    """

    def __init__(
        self,
        log_dir: str | Path,
        *,
        log_every: int = 50,
        lr: Callable[[], float] | None = None,
        collector: MisclassifiedCollector | None = None,
        model: nn.Module | None = None,
        histograms: bool = False,
        purge_step: int | None = None,
        flush_secs: int = 2,
        denormalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
        history: History | None = None,
        images_every: int = 0,
    ) -> None:
        if not isinstance(log_every, int) or log_every < 0:
            raise ValueError(f"log_every must be an integer >= 0, got {log_every!r}")
        if not isinstance(images_every, int) or images_every < 0:
            raise ValueError(f"images_every must be an integer >= 0, got {images_every!r}")
        if histograms and model is None:
            raise ValueError("histograms need the model")
        self.log_dir = Path(log_dir)
        self.log_every = log_every
        self.lr = lr
        self.collector = collector
        self.model = model
        self.histograms = histograms
        self.denormalize = denormalize
        self.history = history
        self.images_every = images_every
        self._logged = 0  # the iteration whose step points were written last
        self._validations = 0  # (a run validating every N iterations) those seen, for images_every
        # tensorboardX names a file by the second it was made and the host: a resumed run started in the same
        # second (a quick restart) would truncate its predecessor's file. The suffix (nanoseconds, then the pid)
        # keeps every file, in the order they were made, which is the order TensorBoard's purge reads them in.
        suffix = f".{time.time_ns():020d}.{os.getpid()}"
        self.logger = TensorboardLogger(log_dir=str(self.log_dir), purge_step=purge_step, flush_secs=flush_secs,
                                        filename_suffix=suffix)
        self.writer = self.logger.writer
        queue_in_thread(self.writer)

    def attach(self, trainer: Engine) -> TensorBoardLogging:
        if self.log_every:
            trainer.add_event_handler(Events.ITERATION_COMPLETED, self._log_if_due)  # no filter: cheaper
        attach_ordered(trainer, record_period(trainer), self.log_epoch, Stage.PUBLISH)
        if self.histograms:
            every = Events.EPOCH_COMPLETED
            self.logger.attach(trainer, WeightsHistHandler(self.model, tag="weights"), every)
            self.logger.attach(trainer, GradsHistHandler(self.model, tag="grads"), every)
        return self

    def _log_if_due(self, engine: Engine) -> None:
        """This step's points, when it is one of every ``log_every`` (once: :meth:`log_iteration` skips a repeat)."""
        if self.log_every and engine.state.iteration % self.log_every == 0:
            self.log_iteration(engine)

    def before_checkpoint(self, engine: Engine) -> None:
        """Before a checkpoint at this iteration: its step's points (if due and not yet logged: the checkpoint's
        handler may run first) and everything queued go to the file, so that a kill after the checkpoint leaves
        every point up to it, and the resume, which purges what comes after, adds each later one once."""
        self._log_if_due(engine)
        self.flush()

    def log_iteration(self, engine: Engine) -> None:
        if engine.state.iteration == self._logged:
            return
        self._logged = engine.state.iteration
        output = engine.state.output
        values = {"loss/train_step": float(output["loss"])}
        if self.lr is not None:
            values["lr"] = self.lr()
        if "grad_norm" in output:
            values["grad_norm"] = float(output["grad_norm"])
        add_scalars_fast(self.writer, values, engine.state.iteration)

    def log_epoch(self, engine: Engine) -> None:
        """The epoch's points, at its last iteration (TensorBoard's step): every point of a run is keyed by the
        iteration, which a resume's purge then covers."""
        epoch, metrics = engine.state.epoch, dict(engine.state.metrics)
        step = engine.state.iteration
        if self.history is not None and self.history.epochs and self.history.epochs[-1]["epoch"] == epoch:
            metrics.update(self.history.epochs[-1])  # epoch time and throughput
        scalars = {}
        for key, value in metrics.items():
            tag = EPOCH_TAGS.get(key) or (None if key.endswith("samples") or key in _ROW_KEYS else f"metrics/{key}")
            if tag is not None and isinstance(value, (int, float)) and math.isfinite(value):
                scalars[tag] = float(value)
        add_scalars_fast(self.writer, scalars, step)
        validated = any(k.startswith("val_") for k in engine.state.metrics)
        counts = self.collector.confusion if self.collector is not None else None
        if validated and counts is not None and self._images_due(engine):
            if counts.shape[0] <= PICTURE_CLASSES:
                add_image_fast(self.writer, "val/confusion_matrix", confusion_matrix_image(counts.to_dense()), step)
            else:
                self.writer.add_text("val/most_confused", confusion_table(counts), step)
            if self.collector.images:
                images = torch.stack(self.collector.images)
                if self.denormalize is not None:
                    images = self.denormalize(images)
                grid = labelled_grid(images, [f"p{p} t{t}" for p, t in self.collector.labels])
                add_image_fast(self.writer, "val/misclassified", grid, step)
        self.flush()

    def flush(self) -> None:
        """Get every event queued so far into the file now (tensorboardX's own ``flush()`` does not)."""
        flush_tensorboardx(self.writer)

    def _images_due(self, engine: Engine) -> bool:
        """After the last validation (also one that stops the run), and every ``images_every`` epochs (or
        validations, for a run validating every N iterations)."""
        state = engine.state
        if by_iteration(engine):
            self._validations += 1
            end = state.iteration == last_iteration(state)
            return bool(end or engine.should_terminate or (self.images_every and
                                                            self._validations % self.images_every == 0))
        last = state.epoch == state.max_epochs or engine.should_terminate  # early stop or a stop signal
        return last or bool(self.images_every and state.epoch % self.images_every == 0)

    def log_hparams(self, config: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """The resolved config and final figures, for the HParams tab (sub-run ``hparams``)."""
        plain = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.items()}
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        add_hparams_fast(self.writer, plain, clean, name="hparams")

    def close(self) -> None:
        self.logger.close()
