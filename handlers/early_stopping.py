"""Early stopping on a validation score, built on Ignite's ``EarlyStopping``.

What this adds: a NaN or infinite score counts as the worst score, never as an improvement
(Ignite's comparison is False for NaN, which it then takes for an improvement); a warm-up of
epochs that are not judged; only epochs with a fresh score are judged; one line saying why it
stopped; state that survives a resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from ignite.engine import Engine, Events
from ignite.handlers import EarlyStopping as _IgniteEarlyStopping

from handlers.ordering import Stage, attach_ordered, record_period

__all__ = ["EarlyStopping"]


class EarlyStopping:
    """Stop ``trainer`` when ``metric`` has not improved by more than ``min_delta`` for ``patience`` checks.

    Args:
        patience: checks without improvement before stopping; ``0`` switches it off.
        min_delta: smallest change that counts as an improvement (absolute).
        warmup: epochs at the start that are not judged at all.
        metric: key in ``trainer.state.metrics`` (epochs without it, e.g. without validation, are not judged).
        mode: ``"max"`` (accuracy) or ``"min"`` (loss).
        log: where the one-line reason goes.
    """

    def __init__(
        self,
        patience: int = 3,
        min_delta: float = 0.0,
        warmup: int = 0,
        metric: str = "val_accuracy",
        mode: str = "max",
        log: Callable[[str], None] = print,
    ) -> None:
        if not isinstance(patience, int) or patience < 0:
            raise ValueError(f"patience must be an integer >= 0 (0 switches early stopping off), got {patience!r}")
        if not isinstance(min_delta, (int, float)) or not math.isfinite(min_delta) or min_delta < 0:
            raise ValueError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
        if not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {warmup!r}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.patience = patience
        self.min_delta = float(min_delta)
        self.warmup = warmup
        self.metric = metric
        self.mode = mode
        self.log = log
        self.stopped_epoch: int | None = None
        # Ignite's handler wants the trainer when built; ours gets it in attach(): a stand-in until then.
        self._inner = _IgniteEarlyStopping(
            patience=max(patience, 1), score_function=self.score, trainer=Engine(lambda e, b: None),
            threshold=self.min_delta, mode=mode,
        )

    @property
    def enabled(self) -> bool:
        return self.patience > 0

    @property
    def counter(self) -> int:
        return self._inner.counter

    @property
    def best_score(self) -> float | None:
        return self._inner.best_score

    def score(self, engine: Engine) -> float:
        """The judged score: the metric, or the worst possible value if it is NaN or infinite."""
        value = float(engine.state.metrics[self.metric])
        if math.isfinite(value):
            return value
        return -math.inf if self.mode == "max" else math.inf

    def attach(self, trainer: Engine) -> EarlyStopping:
        """Judge at each epoch end (Stage.DECISION) and stop ``trainer``; forget old runs when a fresh run starts."""
        if not isinstance(trainer, Engine):
            raise TypeError(f"trainer must be an ignite Engine, got {type(trainer).__name__}")
        self._inner.trainer = trainer
        trainer.add_event_handler(Events.STARTED, self._maybe_reset)
        attach_ordered(trainer, record_period(trainer), self, Stage.DECISION)
        return self

    def _maybe_reset(self, engine: Engine) -> None:
        if engine.state.iteration == 0:  # a fresh run, not a resumed one
            self._inner.reset()
            self.stopped_epoch = None

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        if not self.enabled or epoch <= self.warmup or self.metric not in engine.state.metrics:
            return
        already = engine.should_terminate
        self._inner(engine)
        if engine.should_terminate and not already:
            self.stopped_epoch = epoch
            self.log(
                f"Early stopping at epoch {epoch}: {self.metric} has not improved by more than "
                f"{self.min_delta:g} for {self.patience} validation(s); best {self.best_score:.4f}"
            )

    def state_dict(self) -> dict[str, Any]:
        return {**self._inner.state_dict(), "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._inner.load_state_dict(state)
        self.stopped_epoch = state.get("stopped_epoch")
