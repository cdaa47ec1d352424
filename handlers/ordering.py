"""Handler order that does not depend on the order of ``attach`` calls.

Ignite runs the handlers of an event in the order they were added. Ours instead go through one
dispatcher per (engine, event) that runs them by :class:`Stage`: metrics first, then validation,
then the record of the epoch, then decisions (early stopping, plateau LR), then the records written
out (TensorBoard, history.json: on disk before the checkpoint that follows them, so a kill after it loses
nothing logged), then checkpoints, then the console. Handlers of the same stage keep their attach order.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable
from enum import IntEnum
from typing import Any

from ignite.engine import Engine, EventEnum, Events

__all__ = ["Stage", "attach_ordered", "by_iteration", "last_iteration", "ordered_handlers", "record_period",
           "run_period"]

_counter = itertools.count()


class Stage(IntEnum):
    """When, within one event, a handler runs. Lower runs first."""

    METRICS = 0
    VALIDATION = 10
    RECORD = 20
    DECISION = 30
    PUBLISH = 35  # records on disk (TensorBoard's epoch points, history.json) before the checkpoint after them
    CHECKPOINT = 40
    LOGGING = 50


class _Dispatcher:
    def __init__(self) -> None:
        self.entries: list[tuple[int, int, Callable[..., Any], tuple]] = []

    def add(self, stage: int, fn: Callable[..., Any], args: tuple) -> None:
        bisect.insort(self.entries, (int(stage), next(_counter), fn, args), key=lambda e: (e[0], e[1]))

    def __call__(self, engine: Engine) -> None:
        for _, _, fn, args in self.entries:
            fn(engine, *args)


def attach_ordered(engine: Engine, event: EventEnum, fn: Callable[..., Any], stage: Stage, *args: Any) -> None:
    """Run ``fn(engine, *args)`` on ``event`` of ``engine`` at ``stage`` (see :class:`Stage`).

    Example:
        >>> attach_ordered(trainer, Events.EPOCH_COMPLETED, my_logger, Stage.LOGGING)
    """
    if not isinstance(stage, int):
        raise TypeError(f"stage must be a Stage, got {stage!r}")
    registry: dict[Any, _Dispatcher] = engine.__dict__.setdefault("_ordered_dispatchers", {})
    dispatcher = registry.get(event)
    if dispatcher is None:
        dispatcher = registry[event] = _Dispatcher()
        engine.add_event_handler(event, dispatcher)
    dispatcher.add(stage, fn, args)


def ordered_handlers(engine: Engine, event: EventEnum) -> list[Callable[..., Any]]:
    """The handlers ``attach_ordered`` put on ``event``, in the order they will run."""
    registry = engine.__dict__.get("_ordered_dispatchers", {})
    dispatcher = registry.get(event)
    return [] if dispatcher is None else [fn for _, _, fn, _ in dispatcher.entries]


def wrap_ordered(engine: Engine, wrap: Callable[[Callable[..., Any], EventEnum], Callable[..., Any]]) -> None:
    """Replace every handler ``attach_ordered`` put on ``engine`` by ``wrap(fn, event)``, in place and
    in order (a profiler timing them one by one)."""
    for event, dispatcher in engine.__dict__.get("_ordered_dispatchers", {}).items():
        dispatcher.entries = [(stage, order, wrap(fn, event), args) for stage, order, fn, args in dispatcher.entries]


def run_period(trainer: Engine, every_iters: int | None = None) -> Any:
    """The event at which the run's records close (train metrics published, validation, the history row,
    decisions, checkpoints, console lines): each epoch's end, or with ``every_iters`` every that many
    iterations and at the run's last (once its length is known: a stream's after its first pass). Decided
    once per trainer: every handler asking later gets the same event (one ordered dispatcher)."""
    made = trainer.__dict__.get("_run_period")
    if made is not None:
        return made
    if not every_iters:
        event: Any = Events.EPOCH_COMPLETED
    else:
        def due(engine: Engine, iteration: int) -> bool:
            return iteration % every_iters == 0 or iteration == last_iteration(engine.state)

        event = Events.ITERATION_COMPLETED(event_filter=due)
    trainer.__dict__["_run_period"] = event
    return event


def last_iteration(state: Any) -> int | None:
    """The run's last iteration, once the epochs' length is known (a stream's after its first pass)."""
    return state.max_epochs * state.epoch_length if state.epoch_length and state.max_epochs else None


def record_period(trainer: Engine) -> Any:
    """The trainer's record period (:func:`run_period`), ``EPOCH_COMPLETED`` when none was set."""
    return trainer.__dict__.get("_run_period", Events.EPOCH_COMPLETED)


def by_iteration(trainer: Engine) -> bool:
    """Whether the trainer's records close every N iterations rather than at epoch ends."""
    return record_period(trainer) is not Events.EPOCH_COMPLETED
