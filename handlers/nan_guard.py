"""Stop on a non-finite loss, with one clear line (Ignite's ``TerminateOnNan`` does the check)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import TerminateOnNan

from engine.batch import TARGET_KEYS, tensors_in
from engine.errors import param

__all__ = ["NanGuard", "non_finite_samples"]


def _parts(batch: Any) -> list[tuple[str, Any]]:
    """``("inputs" | "targets", value)`` of a batch: a pair, a dict (by its target key), or inputs alone."""
    if isinstance(batch, Mapping):
        return [("targets" if k in TARGET_KEYS else "inputs", v) for k, v in batch.items()]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return [("inputs", batch[0]), ("targets", batch[1])]
    return [("inputs", batch)]


def non_finite_samples(batch: Any) -> tuple[str, list[int]] | None:
    """``("inputs" or "targets", rows of the batch holding NaN or inf)``, or ``None`` when every
    floating tensor of the batch (a pair, a dict, nested) is finite."""
    for part, value in _parts(batch):
        for t in tensors_in(value):
            if t.is_floating_point() and t.dim() > 0:
                finite = torch.isfinite(t.reshape(t.shape[0], -1)).all(1)
                if not bool(finite.all()):
                    return part, (~finite).nonzero().flatten().tolist()
    return None


def _listed(rows: list[int]) -> str:
    return ", ".join(map(str, rows[:5])) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")


def _inputs_total(batch: Any, device: torch.device) -> torch.Tensor | None:
    """The sum of every floating input tensor of ``batch`` on ``device``, in float32, as a tensor there (no wait;
    one reduction a tensor): finite exactly when the inputs are, or but for a sum that overflows, which inputs
    of ~1e38 earn too; ``None`` when none of the batch's inputs is there."""
    total = None
    for part, value in _parts(batch):
        for t in tensors_in(value):
            if part == "inputs" and t.is_floating_point() and t.device == device:
                s = t.sum(dtype=torch.float32)
                total = s if total is None else total + s
    return total


def _set_rows(data: Any) -> list[int]:
    """The samples (rows) of a set held in memory (a loader's ``x``) whose inputs are not finite."""
    x = getattr(data, "x", None)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0:
        return []
    return (~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)).nonzero().flatten().tolist()


class NanGuard:
    """Terminate the trainer as soon as a batch's loss is NaN or infinite.

    After the run, ``triggered`` tells the caller to exit non-zero; checkpoint handlers check it
    so that no non-finite model becomes ``best`` or replaces the last good ``last_*.pt``.

    ``check_every``: iterations between reads of the loss on the host. 1 (a CPU, where reading it
    costs nothing): every iteration. More (a GPU, where a read waits for the step to finish): each
    iteration's loss is held as it is and its inputs summed on the device (one kernel a step, no wait:
    the record was 17 operators), and the losses held are read at once every ``check_every``
    iterations, at each epoch's end and whenever ``triggered`` is asked (before any save), so the run
    stops a few steps later but nothing non-finite is ever saved.
    """

    def __init__(self, log: Callable[[str], None] = print, check_every: int = 1, data: Any = None) -> None:
        if not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be a positive integer, got {check_every!r}")
        self.log = log
        self.check_every = check_every
        self.data = data  # the training loader: a set held in memory (``.x``) is searched for the samples at fault
        self.triggered_at: tuple[int, int] | None = None
        self._world = 1
        self._held: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []  # deferred: (iteration, loss, inputs' sum)
        self._engine: Engine | None = None
        self._inner = TerminateOnNan(output_transform=self._loss)
        self._inner.logger.setLevel(logging.ERROR)  # our own line replaces its warning

    def _loss(self, output: dict) -> torch.Tensor:
        """The batch loss; in a distributed run summed over ranks, so every rank decides alike."""
        loss = output["loss"]
        if self._world > 1:
            loss = idist.all_reduce(loss.detach().clone())
        return loss

    @property
    def triggered(self) -> bool:
        if self.triggered_at is None and self._held and self._engine is not None:
            self._read(self._engine)
        return self.triggered_at is not None

    def attach(self, trainer: Engine) -> NanGuard:
        self._engine = trainer
        trainer.add_event_handler(Events.STARTED, self._reset)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self)
        if self.check_every > 1:
            trainer.add_event_handler(Events.ITERATION_COMPLETED(every=self.check_every), self._read)
            trainer.add_event_handler(Events.EPOCH_COMPLETED, self._read)
        return self

    def _reset(self, engine: Engine) -> None:
        self.triggered_at = None
        self._held = []
        self._world = idist.get_world_size()

    def _record(self, engine: Engine) -> None:
        """Deferred: the iteration's loss and its inputs' sum kept as they are, on the device (at most one
        reduction a step, no wait); :meth:`_read` looks at them all at once."""
        loss = self._loss(engine.state.output).detach()
        self._held.append((engine.state.iteration, loss, _inputs_total(engine.state.batch, loss.device)))

    def _read(self, engine: Engine) -> None:
        """Deferred: read the losses held (the host waits here, once); stop the run at a non-finite one."""
        if not self._held or self.triggered_at is not None:
            return
        held, self._held = self._held, []
        bad = ~torch.isfinite(torch.stack([loss if loss.dim() == 0 else loss.sum() for _, loss, _ in held]))
        if bool(bad.any()):
            first, loss, inputs = held[int(bad.nonzero()[0])]
            engine.terminate()
            length = engine.state.epoch_length
            epoch = (first - 1) // length + 1 if length else engine.state.epoch
            self.triggered_at = (epoch, first)
            if inputs is not None and not bool(torch.isfinite(inputs)):
                rows = _set_rows(self.data)
                shown = f" (sample(s) {_listed(rows)} of the training set)" if rows else ""
                self.log(f"Stopped: the training batch at epoch {epoch}, iteration {first} holds NaN or infinite inputs"
                         f"{shown}, so the loss became non-finite; the data is at fault, not the training: check the "
                         f"data set and its transforms. No checkpoint was written from this state")
                return
            self.log(f"Stopped: the training loss became non-finite at epoch {epoch}, iteration {first} (seen at "
                     f"iteration {engine.state.iteration}: on {loss.device.type} it is read every "
                     f"{self.check_every} iterations); no checkpoint was written from this state (try a lower "
                     f"{param('lr')}, or {param('clip_grad_norm')})")

    def __call__(self, engine: Engine) -> None:
        if engine.state.output is None or self.triggered_at is not None:
            return
        if self.check_every > 1:
            self._record(engine)
            return
        loss = float(self._loss(engine.state.output))
        if math.isfinite(loss):  # the common case, one float per iteration; Ignite's handler decides the rest
            return
        self._inner(engine)
        if engine.should_terminate and self.triggered_at is None:
            self.triggered_at = (engine.state.epoch, engine.state.iteration)
            where = f"epoch {engine.state.epoch}, iteration {engine.state.iteration}"
            bad = non_finite_samples(engine.state.batch)
            if bad:
                part, rows = bad
                self.log(f"Stopped: the training batch at {where} holds NaN or infinite {part} (sample(s) "
                         f"{_listed(rows)} of "
                         f"the batch), so the loss became {loss}; the data is at fault, not the training: check the "
                         f"data set and its transforms. No checkpoint was written from this state")
                return
            self.log(
                f"Stopped: the training loss became {loss} at {where}; no checkpoint was written from this state "
                f"(try a lower {param('lr')}, or {param('clip_grad_norm')})"
            )
