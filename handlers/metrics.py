"""Training metrics accumulated during the epoch: exact per-sample means, no second pass."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from ignite.engine import Engine, Events
from ignite.metrics import Accuracy, Loss, Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

from engine.epoch import mid_epoch
from handlers.ordering import Stage, attach_ordered

__all__ = ["SampleCount", "TrainMetrics"]


def _step_loss(loss: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The trainer already computed the batch's mean loss: hand it to Ignite's ``Loss`` as is."""
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


class TrainMetrics:
    """``train_loss`` (and, with ``accuracy``, ``train_accuracy``) of the epoch, per-sample means, in
    ``trainer.state.metrics``.

    Ignite's ``Loss`` (fed the loss the step already computed, times the batch size) and ``Accuracy``
    (fed the step's detached logits) accumulate on the device during the epoch; nothing is synced
    per batch. :meth:`running` gives the means so far, for per-batch lines. With ``loss_fn`` the loss
    is that function of the step's logits instead (``fit`` gives the plain cross-entropy when training
    smooths its labels, so that ``train_loss`` and ``val_loss`` measure the same thing).
    """

    def __init__(self, prefix: str = "train_", accuracy: bool = True, loss_fn: Callable | None = None) -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (logits, targets) -> loss, got {type(loss_fn).__name__}")
        self.prefix = prefix
        # what each metric reads of the step's output: the batch's mean loss (or the logits, for loss_fn);
        # the logits (classification only)
        inputs: dict[str, Callable[[dict], tuple]] = {"loss": lambda o: (o["loss"], o["y"])}
        if loss_fn is not None:
            inputs["loss"] = lambda o: (o["y_pred"].float(), o["y"])
        self.metrics: dict[str, Metric] = {"loss": Loss(loss_fn or _step_loss, output_transform=inputs["loss"])}
        if accuracy:
            inputs["accuracy"] = lambda o: (o["y_pred"], o["y"])
            self.metrics["accuracy"] = Accuracy(output_transform=inputs["accuracy"])
        self._updates = [(inputs[name], metric) for name, metric in self.metrics.items()]
        self._pending: dict[str, Any] | None = None
        self._trainer: Engine | None = None

    def attach(self, trainer: Engine) -> "TrainMetrics":
        """Reset at each epoch start, update after each iteration, publish at epoch end (Stage.METRICS)."""
        self._trainer = trainer
        trainer.add_event_handler(Events.EPOCH_STARTED, self._started)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        for name, metric in self.metrics.items():
            attach_ordered(trainer, Events.EPOCH_COMPLETED, metric.completed, Stage.METRICS, self.prefix + name)
        return self

    @torch.no_grad()
    def _update(self, engine: Engine) -> None:
        """Every metric's ``update`` from the step's output: one handler and one no-grad block per
        iteration instead of one each (what Ignite's ``iteration_completed`` adds is for outputs that
        need unrolling or mapping, which the step's never do)."""
        output = engine.state.output
        for transform, metric in self._updates:
            metric.update(transform(output))

    def _started(self, engine: Engine) -> None:
        for metric in self.metrics.values():
            metric.started(engine)
        if self._pending is not None:  # resumed mid-epoch: continue the epoch's sums
            for name, metric in self.metrics.items():
                metric.load_state_dict(self._pending[name])
            self._pending = None

    def running(self) -> dict[str, float]:
        """Means over the batches of this epoch so far (one device sync per call)."""
        return {self.prefix + name: float(metric.compute()) for name, metric in self.metrics.items()}

    def _mid_epoch(self) -> bool:
        return mid_epoch(self._trainer.state if self._trainer is not None else None)

    def state_dict(self) -> dict[str, Any]:
        """The epoch's running sums, so that a run resumed mid-epoch reports the whole epoch."""
        state: dict[str, Any] = {name: dict(metric.state_dict()) for name, metric in self.metrics.items()}
        state["mid_epoch"] = self._mid_epoch()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Applied when the resumed epoch starts (after Ignite's reset), if it was saved mid-epoch."""
        missing = (set(self.metrics) | {"mid_epoch"}) - set(state)
        if missing:
            raise KeyError(f"train metrics state lacks {sorted(missing)}")
        self._pending = {name: state[name] for name in self.metrics} if state["mid_epoch"] else None
