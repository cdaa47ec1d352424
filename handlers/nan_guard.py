"""Stop on a non-finite loss, with one clear line (Ignite's ``TerminateOnNan`` does the check)."""

from __future__ import annotations

import logging
import math
from typing import Callable

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events
from ignite.handlers import TerminateOnNan

from engine.errors import param

__all__ = ["NanGuard"]


class NanGuard:
    """Terminate the trainer as soon as a batch's loss is NaN or infinite.

    After the run, ``triggered`` tells the caller to exit non-zero; checkpoint handlers check it
    so that no non-finite model becomes ``best`` or replaces the last good ``last_*.pt``.
    """

    def __init__(self, log: Callable[[str], None] = print) -> None:
        self.log = log
        self.triggered_at: tuple[int, int] | None = None
        self._world = 1
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
        return self.triggered_at is not None

    def attach(self, trainer: Engine) -> "NanGuard":
        trainer.add_event_handler(Events.STARTED, self._reset)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self)
        return self

    def _reset(self, engine: Engine) -> None:
        self.triggered_at = None
        self._world = idist.get_world_size()

    def __call__(self, engine: Engine) -> None:
        if engine.state.output is None:
            return
        loss = float(self._loss(engine.state.output))
        if math.isfinite(loss):  # the common case, one float per iteration; Ignite's handler decides the rest
            return
        self._inner(engine)
        if engine.should_terminate and self.triggered_at is None:
            self.triggered_at = (engine.state.epoch, engine.state.iteration)
            self.log(
                f"Stopped: the training loss became {loss} at epoch {engine.state.epoch}, "
                f"iteration {engine.state.iteration}; no checkpoint was written from this state "
                f"(try a lower {param('lr')}, or {param('clip_grad_norm')})"
            )
