"""Training metrics accumulated during the epoch: exact per-sample means, no second pass."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.metrics import Accuracy, Loss, Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

from engine.batch import to_device
from engine.epoch import batch_in_epoch, mid_epoch
from handlers.adapters import move_metric_state
from handlers.ordering import Stage, attach_ordered, by_iteration, record_period

__all__ = ["AccuracyView", "SampleCount", "TrainMetrics", "validation_metrics"]


class AccuracyView:
    """How the accuracy (and the confusion matrix) read ``(y_pred, y)`` under ``loss_fn``.

    Class labels as they are. Soft labels (float targets shaped like the output, under cross-entropy:
    mixup, cutmix, distillation) by their most likely class. Under ``BCEWithLogitsLoss`` or
    ``BCELoss`` (binary or multi-label targets of 0 and 1, shaped like the output) every output is
    thresholded (at 0 for logits, 0.5 for probabilities) against its target, and every label counts
    (Keras's binary accuracy); ``per_label`` is then true and there is no confusion matrix.
    """

    def __init__(self, loss_fn: Callable | None = None) -> None:
        self.threshold = (0.0 if isinstance(loss_fn, torch.nn.BCEWithLogitsLoss) else
                          0.5 if isinstance(loss_fn, torch.nn.BCELoss) else None)  # fmt: skip

    @property
    def per_label(self) -> bool:
        return self.threshold is not None

    def __call__(self, output: Any) -> tuple[Any, Any]:
        y_pred, y = output[0], output[1]
        if isinstance(y, torch.Tensor) and isinstance(y_pred, torch.Tensor) and y.is_floating_point() \
                and y.shape == y_pred.shape:  # fmt: skip
            if self.threshold is not None:
                return (y_pred > self.threshold).long(), (y > 0.5).long()
            if y.dim() >= 2:
                return y_pred, y.argmax(1)
        return y_pred, y


def _step_loss(loss: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The trainer already computed the mean loss (of a batch, or of a group of them): hand it to
    Ignite's ``Loss`` as is."""
    return loss


class SampleCount(Metric):
    """How many samples went through the engine (summed over processes)."""

    _state_dict_all_req_keys = ("_count",)

    @reinit__is_reduced
    def reset(self) -> None:
        self._count = torch.zeros((), dtype=torch.long, device=self._device)

    @reinit__is_reduced
    def update(self, output: Any) -> None:
        self._count += output[1].shape[0]

    @sync_all_reduce("_count")
    def compute(self) -> int:
        return int(self._count.item())


# batches whose outputs go to the metrics in one update: the console's default cadence (--log-every 50), whose
# lines then find nothing held back and need no copies (the groups still never depend on the cadence)
_GROUP_BATCHES = 50
_GROUP_ELEMENTS = 1 << 18  # at most this many prediction elements held back (1 MiB of fp32)


class TrainMetrics:
    """``train_loss`` (and, with ``accuracy``, ``train_accuracy``) of the epoch, per-sample means, in
    ``trainer.state.metrics``.

    Ignite's ``Loss`` (fed the loss the step already computed, weighted by the batch size) and
    ``Accuracy`` (fed the step's detached logits) accumulate on the device during the epoch; nothing is
    synced per batch (read through ``accuracy_view``: :class:`AccuracyView`). :meth:`running` gives the
    means so far, for per-batch lines. With ``loss_fn`` the
    loss is that function of the step's logits instead (``fit`` gives the plain cross-entropy when
    training smooths its labels, so that ``train_loss`` and ``val_loss`` measure the same thing).

    The steps' outputs reach the metrics in groups of up to 50 batches (one concatenated update
    instead of 50: right after the optimizer step each small op costs ~100 us on a CPU, and the
    update per batch was ~1.5% of a small model's epoch; 50, the console's default cadence, so that its
    lines find the group just closed). The batches held back are part of
    :meth:`state_dict`, so a resumed run groups, and sums, exactly as an uninterrupted one. A group is
    fed concatenated where ``torch.cat`` can join it (the same shapes past the batch, one device), else
    as runs of consecutive batches of one signature (shapes past the batch, dtypes, devices); a batch
    that joins neither neighbour (not tensors) goes alone, and so do large ones (nothing of this is
    checked every step). Where a group ends depends on the data alone, so the
    sums (float32, whose last bits depend on how they are grouped) are the same whatever prints them
    and how often: :meth:`running` feeds copies of the metrics. ``flush_every`` also closes the group
    after every batch of the epoch whose number is divisible by it (a line printed then finds nothing
    held back), at the price of sums that then depend on it; the run does not use it.
    """

    def __init__(self, prefix: str = "train_", accuracy: bool = True, loss_fn: Callable | None = None,
                 accuracy_view: Callable[[Any], tuple[Any, Any]] | None = None, flush_every: int = 0,
                 device: str | torch.device = "cpu") -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        if not isinstance(flush_every, int) or isinstance(flush_every, bool) or flush_every < 0:
            raise TypeError(f"flush_every must be an integer >= 0 (0: only when a group is full), got {flush_every!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (logits, targets) -> loss, got {type(loss_fn).__name__}")
        self.prefix = prefix
        self.loss_fn = loss_fn
        self.accuracy_view = accuracy_view or AccuracyView()
        self.flush_every = flush_every
        device = torch.device(device)
        self.device = device if device.type in ("cpu", "cuda") else torch.device("cpu")  # MPS: no float64 sums
        self.metrics: dict[str, Metric] = {"loss": Loss(loss_fn or _step_loss, device=self.device)}
        if accuracy:
            self.metrics["accuracy"] = Accuracy(device=self.device)
        self._group: list[tuple[Any, Any, Any]] = []  # (loss, y_pred, y) of the batches held back
        self._group_elements = 0
        self._restored = False  # whether the group is the one a checkpoint held back
        self._pending: dict[str, Any] | None = None
        self._trainer: Engine | None = None

    def attach(self, trainer: Engine) -> TrainMetrics:
        """Reset at each epoch start, update after each iteration, publish at epoch end (Stage.METRICS)."""
        self._trainer = trainer
        trainer.add_event_handler(Events.EPOCH_STARTED, self._started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        attach_ordered(trainer, Events.EPOCH_COMPLETED, self._flush, Stage.METRICS)  # before the metrics publish
        for name, metric in self.metrics.items():
            attach_ordered(trainer, Events.EPOCH_COMPLETED, metric.completed, Stage.METRICS, self.prefix + name)
        if by_iteration(trainer):  # a validation inside an epoch: the epoch's means so far, as the console's
            attach_ordered(trainer, record_period(trainer), self._publish_running, Stage.METRICS)
        return self

    def _publish_running(self, engine: Engine) -> None:
        engine.state.metrics.update(self.running())

    def _update(self, engine: Engine) -> None:
        """Hold the step's output back for the group (one handler per iteration, not one per metric; what can
        be concatenated is sorted out when the group is fed, not every step)."""
        output = engine.state.output
        y_pred = output["y_pred"]
        if self._restored and isinstance(y_pred, torch.Tensor):  # held back by the checkpoint's run, loaded on
            self._group = to_device(self._group, y_pred.device)  # the CPU: onto this run's device
            self._restored = False
        self._group.append((output["loss"], y_pred, output["y"]))
        self._group_elements += y_pred.numel() if isinstance(y_pred, torch.Tensor) else _GROUP_ELEMENTS
        if len(self._group) >= _GROUP_BATCHES or self._group_elements >= _GROUP_ELEMENTS or (
                self.flush_every and batch_in_epoch(engine.state) % self.flush_every == 0):
            self._flush()

    def _flush(self, engine: Engine | None = None) -> None:
        """The batches held back into the metrics."""
        if self._group:
            group, self._group, self._group_elements = self._group, [], 0
            self._feed_group(self.metrics, group)

    def _feed_group(self, metrics: Mapping[str, Metric], group: list[tuple[Any, Any, Any]]) -> None:
        """One update of each metric for the group concatenated (one check for the whole group: ``torch.cat``'s);
        where it cannot be (other shapes past the batch, devices, not tensors, losses not scalars), one for each
        run of batches that can, in the order they came."""
        joined = self._joined(group) if len(group) > 1 else None
        if joined is not None:
            self._feed(metrics, *joined)
            return
        for run in _runs(group):
            joined = self._joined(run) if len(run) > 1 else None
            for loss, y_pred, y in run if joined is None else [joined]:
                self._feed(metrics, loss, y_pred, y)

    @torch.no_grad()
    def _joined(self, group: list[tuple[Any, Any, Any]]) -> tuple[Any, torch.Tensor, torch.Tensor] | None:
        """(loss, y_pred, y) of the batches concatenated: the loss their per-sample mean (the steps' means
        weighted by their batch sizes, no host copy; ``None`` when ``loss_fn`` computes it), or ``None``."""
        try:
            y_pred, y = torch.cat([g[1] for g in group]), torch.cat([g[2] for g in group])
            return (None if self.loss_fn is not None else _weighted_sum(group) / y.shape[0]), y_pred, y
        except (RuntimeError, TypeError, ValueError):
            return None

    @torch.no_grad()
    def _feed(self, metrics: Mapping[str, Metric], loss: Any, y_pred: Any, y: Any) -> None:
        metrics["loss"].update((y_pred.float(), y) if self.loss_fn is not None else (loss, y))
        if "accuracy" in metrics:
            metrics["accuracy"].update(self.accuracy_view((y_pred, y)))

    def _started(self, engine: Engine) -> None:
        self._group, self._group_elements, self._restored = [], 0, False
        for metric in self.metrics.values():
            metric.started(engine)
        if self._pending is not None:  # resumed mid-epoch: continue the epoch's sums and the group held back
            for name, metric in self.metrics.items():
                metric.load_state_dict(self._pending[name])
                move_metric_state(metric, self.device)  # saved from any device, read onto the CPU
            self._group = [(held["loss"], held["y_pred"], held["y"]) for held in self._pending["held_back"]]
            self._group_elements = sum(y_pred.numel() for _, y_pred, _ in self._group)
            self._restored = bool(self._group)
            self._pending = None

    def running(self) -> dict[str, float]:
        """Means over the batches of this epoch so far (one device sync per call); changes nothing."""
        metrics = self.metrics
        if self._group:  # on copies: where the groups end must not depend on who looked when
            metrics = {name: copy.deepcopy(metric) for name, metric in self.metrics.items()}
            self._feed_group(metrics, self._group)
        return {self.prefix + name: float(metric.compute()) for name, metric in metrics.items()}

    def _mid_epoch(self) -> bool:
        return mid_epoch(self._trainer.state if self._trainer is not None else None)

    def state_dict(self) -> dict[str, Any]:
        """The epoch's running sums and the batches held back, so that a run resumed mid-epoch reports
        the whole epoch, to the last bit."""
        state: dict[str, Any] = {name: dict(metric.state_dict()) for name, metric in self.metrics.items()}
        state["mid_epoch"] = self._mid_epoch()
        held = [{"loss": _saved(loss), "y_pred": _saved(y_pred), "y": _saved(y)} for loss, y_pred, y in self._group]
        state["held_back"] = idist.all_gather(held) if idist.get_world_size() > 1 else [held]  # one list per rank
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Applied when the resumed epoch starts (after Ignite's reset), if it was saved mid-epoch."""
        missing = (set(self.metrics) | {"mid_epoch"}) - set(state)
        if missing:
            raise KeyError(f"train metrics state lacks {sorted(missing)}")
        if not state["mid_epoch"]:
            self._pending = None
            return
        self._pending = {name: state[name] for name in self.metrics}
        ranks = state.get("held_back", [])  # files of earlier versions hold none
        rank = idist.get_rank()
        self._pending["held_back"] = list(ranks[rank]) if len(ranks) == idist.get_world_size() else []


def _saved(t: Any) -> Any:
    """A held-back tensor as a checkpoint stores it: on the CPU, in its own storage (not the whole
    tensor a slice of targets may view)."""
    return t.detach().to("cpu", copy=True) if isinstance(t, torch.Tensor) else t


def _weighted_sum(group: list[tuple[Any, Any, Any]]) -> torch.Tensor:
    """The sum of each step's mean loss times its batch size: one multiplication for a group whose batches are
    of one size (the same products, to the bit, as one per step, and no copy to the device), else one a step.
    ``ValueError`` if the losses are not scalars."""
    sizes = [g[2].shape[0] for g in group]  # not len(): Tensor.__len__ is Python, ~1 us a call
    if sizes.count(sizes[0]) == len(sizes):
        losses = torch.stack([g[0] for g in group]).mul_(sizes[0])
    else:
        losses = torch.stack([g[0] * n for g, n in zip(group, sizes)])
    if losses.dim() != 1:
        raise ValueError("the steps' losses are not scalars")
    return losses.sum()


def _runs(group: list[tuple[Any, Any, Any]]) -> list[list[tuple[Any, Any, Any]]]:
    """``group`` cut into runs of consecutive batches that concatenate (the same :func:`_signature`); a batch
    whose outputs never do is a run of its own."""
    runs: list[list[tuple[Any, Any, Any]]] = []
    last: tuple | None = None
    for item in group:
        signature = _signature(item)
        if signature is None or signature != last:
            runs.append([item])
        else:
            runs[-1].append(item)
        last = signature
    return runs


def _signature(item: tuple[Any, Any, Any]) -> tuple | None:
    """What must match for ``item`` (loss, y_pred, y) to be concatenated onto a group: dtypes, dims, the shapes
    past the batch and the devices; ``None`` for an item that never joins (not tensors, a loss not a scalar)."""
    loss, y_pred, y = item
    if not (isinstance(loss, torch.Tensor) and isinstance(y_pred, torch.Tensor) and isinstance(y, torch.Tensor)):
        return None
    if loss.dim() != 0 or y_pred.dim() == 0 or y.dim() == 0:
        return None
    return loss.dtype, loss.device, y_pred.dtype, y_pred.shape[1:], y_pred.device, y.dtype, y.shape[1:], y.device


def validation_metrics(loss_fn: Callable, classification: bool, view: AccuracyView,
                       extra: Mapping[str, Metric] | None = None) -> dict[str, Metric]:  # fmt: skip
    """The metrics of a validation (and of ``evaluate``): ``loss`` (a per-sample mean), ``accuracy`` for a
    classifier (read through ``view``), the user's ``extra`` and ``samples``, in that order."""
    metrics: dict[str, Metric] = {"loss": Loss(loss_fn)}
    if classification:
        metrics["accuracy"] = Accuracy(output_transform=view)
    metrics.update({**(extra or {}), "samples": SampleCount()})
    return metrics
