"""Learning-rate schedules from Ignite's param schedulers, chosen by name, with warm-up and resume."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import (
    CosineAnnealingScheduler,
    PiecewiseLinear,
    ReduceLROnPlateauScheduler,
    create_lr_scheduler_with_warmup,
)

from engine.errors import ConfigError, param
from engine.settings import SCHEDULERS
from handlers.ordering import Stage, attach_ordered, record_period

__all__ = ["SCHEDULERS", "LRSchedule"]

_PLATEAU_KEYS = ("best", "num_bad_epochs", "cooldown_counter", "last_epoch")


class LRSchedule:
    """The LR schedule of a run: ``none``, ``step``, ``cosine``, ``onecycle`` or ``plateau``.

    Per-iteration schedules (step, cosine, onecycle and every warm-up) are Ignite param schedulers
    on ``ITERATION_STARTED``; ``plateau`` is Ignite's ``ReduceLROnPlateauScheduler`` following
    ``metric`` after each validation (Stage.DECISION).

    Args:
        name: one of :data:`SCHEDULERS`.
        optimizer: whose ``lr`` is scheduled; its current ``lr`` is the peak.
        epochs: length of the run in epochs, for schedules defined over it.
        epoch_length: iterations an epoch (``None``, a stream of unknown length: ``none`` and ``plateau`` only).
        warmup_epochs: linear warm-up from ``lr / 100`` (onecycle: its rising phase; default 25%).
        step_epochs: ``step`` multiplies the LR by ``gamma`` every ``step_epochs`` epochs.
        gamma: the factor of ``step``.
        plateau_patience: validations without improvement before ``plateau`` lowers the LR.
        plateau_factor: what ``plateau`` multiplies the LR by then.
        metric: what ``plateau`` follows.
        mode: ``"max"`` or ``"min"``, the direction of an improvement of ``metric``.
    """

    def __init__(
        self,
        name: str,
        optimizer: torch.optim.Optimizer,
        *,
        epochs: int,
        epoch_length: int | None,
        warmup_epochs: float = 0.0,
        step_epochs: int | None = None,
        gamma: float = 0.1,
        plateau_patience: int = 1,
        plateau_factor: float = 0.1,
        metric: str = "val_accuracy",
        mode: str = "max",
    ) -> None:
        epoch_length = _checked(name, epochs, epoch_length, warmup_epochs, step_epochs, gamma, plateau_factor)
        self.name = name
        self.optimizer = optimizer
        self.peak = float(optimizer.param_groups[0]["lr"])
        total = epochs * epoch_length
        warm = int(round(warmup_epochs * epoch_length))
        self.per_iteration: Any = None
        self.plateau: ReduceLROnPlateauScheduler | None = None
        self._warmup_only = 0  # > 0: a bare warm-up of that many iterations
        lr = self.peak
        if name == "onecycle":
            up = warm if warm > 0 else max(1, total // 4)
            self.per_iteration = PiecewiseLinear(
                optimizer, "lr", [(0, lr / 25), (up, lr), (max(total - 1, up + 1), lr / 1e4)]
            )
            return
        main: Any = None
        if name == "step":
            size = (step_epochs or max(1, epochs // 3)) * epoch_length
            steps = range(0, total - warm, size)  # piecewise constant: adjacent milestones make the jumps
            points = [pt for k, start in enumerate(steps)
                      for pt in ((start, lr * gamma**k), (start + size - 1, lr * gamma**k))]
            main = PiecewiseLinear(optimizer, "lr", points)
        elif name == "cosine":
            main = CosineAnnealingScheduler(optimizer, "lr", lr, lr / 1e3, cycle_size=max(2, total - warm + 1))
        elif name == "plateau":
            self.plateau = ReduceLROnPlateauScheduler(
                optimizer, metric_name=metric, mode=mode, patience=plateau_patience, factor=plateau_factor
            )
        if warm > 0:
            if main is None:  # none or plateau: a warm-up alone, which then leaves the LR alone
                self.per_iteration = PiecewiseLinear(optimizer, "lr", [(0, lr / 100), (warm, lr)])
                self._warmup_only = warm
                return
            self.per_iteration = create_lr_scheduler_with_warmup(main, lr / 100, warm, warmup_end_value=lr)
        else:
            self.per_iteration = main

    def attach(self, trainer: Engine) -> LRSchedule:
        if self.per_iteration is not None:
            event = Events.ITERATION_STARTED
            if self._warmup_only:
                limit = self._warmup_only
                event = Events.ITERATION_STARTED(event_filter=lambda _, i: i <= limit + 1)
            trainer.add_event_handler(event, self.per_iteration)
        if self.plateau is not None:
            attach_ordered(trainer, record_period(trainer), self._plateau_step, Stage.DECISION)
        return self

    def _plateau_step(self, trainer: Engine) -> None:
        if self.plateau is not None and self.plateau.metric_name in trainer.state.metrics:
            self.plateau(trainer)

    @property
    def lr(self) -> float:
        """The learning rate now in the optimizer (first param group)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"name": self.name}
        if self.per_iteration is not None:
            state["per_iteration"] = self.per_iteration.state_dict()
        if self.plateau is not None:
            inner = self.plateau.scheduler
            state["plateau"] = {k: getattr(inner, k) for k in _PLATEAU_KEYS}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ConfigError(
                f"the checkpoint was made with {param('scheduler', state.get('name'))}, not {self.name}: "
                f"resume with {param('scheduler', state.get('name'))}"
            )
        if self.per_iteration is not None:
            self.per_iteration.load_state_dict(state["per_iteration"])
        if self.plateau is not None:
            for k, v in state["plateau"].items():
                setattr(self.plateau.scheduler, k, v)


def _checked(name: str, epochs: int, epoch_length: int | None, warmup_epochs: float, step_epochs: int | None,
             gamma: float, plateau_factor: float) -> int:  # fmt: skip
    """:class:`LRSchedule`'s arguments checked (a ``ValueError`` naming the first wrong one); the epoch
    length to schedule over (1 for a stream of unknown length, where nothing spans the run's iterations)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}: use one of {', '.join(SCHEDULERS)}")
    if epoch_length is None:
        if name not in ("none", "plateau") or warmup_epochs:
            raise ValueError(f"{name} (and a warm-up) needs epoch_length; a stream's is unknown")
        epoch_length = 1
    if not isinstance(epochs, int) or epochs < 1 or not isinstance(epoch_length, int) or epoch_length < 1:
        raise ValueError(f"epochs and epoch_length must be positive integers, got {epochs!r}, {epoch_length!r}")
    if not 0 <= warmup_epochs < epochs:
        raise ValueError(f"warmup_epochs must be >= 0 and less than epochs ({epochs}), got {warmup_epochs!r}")
    if step_epochs is not None and (not isinstance(step_epochs, int) or step_epochs < 1):
        raise ValueError(f"step_epochs must be a positive integer, got {step_epochs!r}")
    if not 0 < gamma <= 1 or not 0 < plateau_factor < 1:
        raise ValueError("gamma must be in (0, 1] and plateau_factor in (0, 1)")
    return epoch_length
