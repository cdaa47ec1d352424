"""TensorBoard logging through Ignite's ``TensorboardLogger`` (tensorboardX underneath).

Tags, grouped so TensorBoard's cards read well:

- step = iteration: ``loss/train_step`` (batch loss), ``lr``, ``grad_norm``, every ``log_every`` iterations;
- step = epoch: ``loss/train``, ``loss/val``, ``accuracy/train``, ``accuracy/val``,
  ``time/epoch_seconds``, ``time/samples_per_second``;
- everything is in the file when an epoch's logging returns (see :meth:`TensorBoardLogging.flush`);
- images after the last validation of the run (and every ``images_every`` epochs if set; drawing
  and encoding them costs about 45 ms): ``val/confusion_matrix``, ``val/misclassified``;
- once the run ends: hparams (the resolved config) with ``hparam/best_val_accuracy`` and
  ``hparam/final_val_accuracy``, in the ``hparams`` sub-run.

On resume, everything logged after the checkpoint's iteration is purged (``purge_step``), so no
step appears twice. Events are flushed every ``flush_secs`` seconds and, completely, at each epoch end.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import TensorboardLogger
from ignite.handlers.tensorboard_logger import GradsHistHandler, WeightsHistHandler
from torch import nn

from handlers.adapters import add_hparams_fast, add_image_fast, add_scalars_fast, flush_tensorboardx, queue_in_thread
from handlers.history import History
from handlers.images import confusion_matrix_image, labelled_grid
from handlers.ordering import Stage, attach_ordered

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


class MisclassifiedCollector:
    """Keeps the first ``limit`` misclassified samples of each evaluator run, and its confusion counts
    (summed over processes in a distributed run). ``num_classes``: default, the width of the logits."""

    def __init__(self, num_classes: int | None = None, limit: int = 64,
                 view: Callable[[Any], tuple[Any, Any]] | None = None) -> None:
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"num_classes must be an integer >= 2 or None, got {num_classes!r}")
        if not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be an integer >= 0, got {limit!r}")
        self.num_classes = num_classes
        self.limit = limit
        self.view = view  # (y_pred, y) -> (y_pred, labels): soft labels by their most likely class
        self.images: list[torch.Tensor] = []
        self.labels: list[tuple[int, int]] = []
        self.confusion = torch.zeros(num_classes or 0, num_classes or 0, dtype=torch.long)

    def attach(self, evaluator: Engine) -> "MisclassifiedCollector":
        evaluator.add_event_handler(Events.STARTED, self.reset)
        evaluator.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        evaluator.add_event_handler(Events.COMPLETED, self._reduce)
        return self

    def _reduce(self, engine: Engine) -> None:
        """In a distributed run, count every rank's shard (the digits shown stay rank 0's)."""
        if idist.get_world_size() > 1 and self.confusion.numel():
            self.confusion = idist.all_reduce(self.confusion)

    def reset(self, engine: Engine | None = None) -> None:
        self.images, self.labels = [], []
        self.confusion.zero_()

    def update(self, engine: Engine) -> None:
        y_pred, y = self.view(engine.state.output) if self.view is not None else engine.state.output
        if not self.confusion.numel():  # first batch: the logits say how many classes, unless given
            self.num_classes = self.num_classes or y_pred.shape[1]
            self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long)
        pred = y_pred.argmax(1)
        index = (y * self.num_classes + pred).cpu()
        self.confusion += torch.bincount(index, minlength=self.num_classes**2).view(self.num_classes, -1)
        room = self.limit - len(self.images)
        x = getattr(engine.state, "inputs", None)  # the evaluator's prepared input
        if room > 0 and _is_image_batch(x) and x.shape[0] == y.shape[0]:
            wrong = (pred != y).nonzero().flatten()[:room].cpu()
            for i in wrong.tolist():
                self.images.append(x[i].detach().float().cpu().reshape(-1, *x.shape[-2:]))
                self.labels.append((int(pred[i]), int(y[i])))


def _is_image_batch(x: Any) -> bool:
    """(N, H, W) grey, or (N, C, H, W) with 1 or 3 channels: something to show as pictures."""
    return isinstance(x, torch.Tensor) and x.dim() == 3 or (x.dim() == 4 and x.shape[1] in (1, 3))


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
        self.logger = TensorboardLogger(log_dir=str(self.log_dir), purge_step=purge_step, flush_secs=flush_secs)
        self.writer = self.logger.writer
        queue_in_thread(self.writer)

    def attach(self, trainer: Engine) -> "TensorBoardLogging":
        if self.log_every:
            trainer.add_event_handler(Events.ITERATION_COMPLETED(every=self.log_every), self.log_iteration)
        attach_ordered(trainer, Events.EPOCH_COMPLETED, self.log_epoch, Stage.LOGGING)
        if self.histograms:
            every = Events.EPOCH_COMPLETED
            self.logger.attach(trainer, WeightsHistHandler(self.model, tag="weights"), every)
            self.logger.attach(trainer, GradsHistHandler(self.model, tag="grads"), every)
        return self

    def log_iteration(self, engine: Engine) -> None:
        output = engine.state.output
        values = {"loss/train_step": float(output["loss"])}
        if self.lr is not None:
            values["lr"] = self.lr()
        if "grad_norm" in output:
            values["grad_norm"] = float(output["grad_norm"])
        add_scalars_fast(self.writer, values, engine.state.iteration)

    def log_epoch(self, engine: Engine) -> None:
        epoch, metrics = engine.state.epoch, dict(engine.state.metrics)
        if self.history is not None and self.history.epochs and self.history.epochs[-1]["epoch"] == epoch:
            metrics.update(self.history.epochs[-1])  # epoch time and throughput
        scalars = {}
        for key, value in metrics.items():
            tag = EPOCH_TAGS.get(key) or (None if key.endswith("samples") or key in _ROW_KEYS else f"metrics/{key}")
            if tag is not None and isinstance(value, (int, float)) and math.isfinite(value):
                scalars[tag] = float(value)
        add_scalars_fast(self.writer, scalars, epoch)
        validated = any(k.startswith("val_") for k in engine.state.metrics)
        if validated and self.collector is not None and self.collector.confusion.numel() and self._images_due(engine):
            add_image_fast(self.writer, "val/confusion_matrix", confusion_matrix_image(self.collector.confusion), epoch)
            if self.collector.images:
                images = torch.stack(self.collector.images)
                if self.denormalize is not None:
                    images = self.denormalize(images)
                grid = labelled_grid(images, [f"p{p} t{t}" for p, t in self.collector.labels])
                add_image_fast(self.writer, "val/misclassified", grid, epoch)
        self.flush()

    def flush(self) -> None:
        """Get every event queued so far into the file now (tensorboardX's own ``flush()`` does not)."""
        flush_tensorboardx(self.writer)

    def _images_due(self, engine: Engine) -> bool:
        epoch = engine.state.epoch
        last = epoch == engine.state.max_epochs or engine.should_terminate  # early stop or a stop signal
        return last or bool(self.images_every and epoch % self.images_every == 0)

    def log_hparams(self, config: Mapping[str, Any], metrics: Mapping[str, float]) -> None:
        """The resolved config and final figures, for the HParams tab (sub-run ``hparams``)."""
        plain = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config.items()}
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        add_hparams_fast(self.writer, plain, clean, name="hparams")

    def close(self) -> None:
        self.logger.close()
