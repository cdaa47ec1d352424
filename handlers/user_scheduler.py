"""Your own LR scheduler, run as PyTorch and Ignite users expect and saved in every checkpoint.

``fit(..., lr_scheduler=..., lr_scheduler_interval="step" | "epoch")`` takes a torch ``LRScheduler`` built on
the optimizer you pass, a function ``fn(optimizer) -> scheduler`` (for the optimizer ``fit`` makes), a
``ReduceLROnPlateau`` (stepped on the monitored metric after each validation), or an Ignite
``ParamScheduler`` (run where Ignite runs one: before each iteration, or at each epoch's start). A torch
scheduler steps after each optimizer step (``"step"``: after each accumulation window) or after each
epoch and its validation (``"epoch"``), as Lightning's ``interval`` says. What history, TensorBoard and the
console record is the learning rate each step used, whoever set it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers.param_scheduler import ParamScheduler

from engine.errors import ConfigError, param
from handlers.feature import RunFeature, RunParts
from handlers.ordering import Stage, attach_ordered, record_period

__all__ = ["INTERVALS", "UserScheduler"]

INTERVALS = ("step", "epoch")
_TORCH = torch.optim.lr_scheduler.LRScheduler
_PLATEAU = torch.optim.lr_scheduler.ReduceLROnPlateau


class UserScheduler(RunFeature):
    """The run's part for a user's ``scheduler`` (see the module), stepped per ``interval``."""

    def __init__(self, scheduler: Any, interval: str = "step") -> None:
        if interval not in INTERVALS:
            raise ConfigError(f"lr_scheduler_interval must be one of {', '.join(INTERVALS)}, got {interval!r}")
        if not (isinstance(scheduler, (_TORCH, _PLATEAU, ParamScheduler)) or callable(scheduler)):
            raise ConfigError(f"lr_scheduler must be a torch LRScheduler, an Ignite ParamScheduler or a function of "
                              f"the optimizer returning one, got {type(scheduler).__name__}")
        self.given, self.interval = scheduler, interval
        self.scheduler: Any = None
        self.monitor: str | None = None

    @classmethod
    def of(cls, scheduler: Any, interval: str, parts: RunParts) -> UserScheduler | None:
        """The feature for ``scheduler`` (``None``: none given); one line if the settings ask for a schedule too."""
        if scheduler is None:
            return None
        if parts.settings.scheduler != "none":
            raise ConfigError(f"both {param('scheduler', parts.settings.scheduler)} and an lr_scheduler were given: "
                              f"keep one (the settings' schedule is the default: {param('scheduler', 'none')})")
        return cls(scheduler, interval)

    def on_trainer(self, parts: RunParts) -> None:
        built = self.given
        if not isinstance(built, (_TORCH, _PLATEAU, ParamScheduler)):
            built = built(parts.optimizer)
            if not isinstance(built, (_TORCH, _PLATEAU, ParamScheduler)):
                raise ConfigError(f"lr_scheduler(optimizer) returned a {type(built).__name__}, not a scheduler")
        if getattr(built, "optimizer", parts.optimizer) is not parts.optimizer:
            raise ConfigError("the lr_scheduler steps another optimizer than the run's: build it on the optimizer "
                              "you pass to fit (optimizer=...), or pass a function lr_scheduler=fn(optimizer)")
        self.scheduler, self.monitor = built, parts.settings.watched(parts.classification)[0]
        self.attach(parts.trainer)

    def attach(self, trainer: Engine) -> UserScheduler:
        """Step the scheduler at its interval on ``trainer``."""
        s = self.scheduler
        if isinstance(s, ParamScheduler):
            trainer.add_event_handler(Events.ITERATION_STARTED if self.interval == "step" else Events.EPOCH_STARTED, s)
        elif isinstance(s, _PLATEAU):
            attach_ordered(trainer, record_period(trainer), self._plateau, Stage.DECISION)
        elif self.interval == "step":
            step = getattr(trainer, "train_step", None)
            trainer.add_event_handler(Events.ITERATION_COMPLETED,
                                      lambda _: s.step() if step is None or step.stepped else None)
        else:
            attach_ordered(trainer, Events.EPOCH_COMPLETED, lambda _: s.step(), Stage.DECISION)
        return self

    def _plateau(self, trainer: Engine) -> None:
        if self.monitor in trainer.state.metrics:  # a validation ran: step on its score
            self.scheduler.step(float(trainer.state.metrics[self.monitor]))

    def saved(self, saved: dict[str, Any]) -> dict[str, Any]:
        return {**saved, "lr_scheduler": self}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.scheduler.state_dict())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.scheduler.load_state_dict(dict(state))
