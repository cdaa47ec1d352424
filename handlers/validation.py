"""Epoch-end validation: run the evaluator and publish its metrics on the trainer."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ignite.engine import Engine

from engine.errors import ConfigError, param
from handlers.ordering import Stage, attach_ordered, by_iteration, record_period

__all__ = ["Validation"]


class Validation:
    """Every ``every`` epochs (and after the last one) run ``evaluator`` over the whole ``loader``.

    Its metrics land in ``trainer.state.metrics`` as ``<prefix><name>`` (``val_loss``,
    ``val_accuracy``, ...), before any decision or checkpoint handler runs (Stage.VALIDATION).
    On epochs without validation those keys are removed, so nothing acts on a stale score.

    ``watched`` maps a setting to the metric it names (``{"monitor": "val_accuracy"}``): after the
    first validation a name that is not among the trainer's metrics stops the run with a
    :class:`ConfigError` listing those that are (a misspelled name would otherwise switch early
    stopping and best checkpoints off without a word).
    """

    def __init__(
        self,
        evaluator: Engine,
        loader: Iterable,
        every: int = 1,
        prefix: str = "val_",
        watched: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(evaluator, Engine):
            raise TypeError(f"evaluator must be an ignite Engine, got {type(evaluator).__name__}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        self.evaluator = evaluator
        self.loader = loader
        self.every = every
        self.prefix = prefix
        self.watched = dict(watched or {})
        self._by_iteration = False

    def is_due(self, epoch: int, max_epochs: int | None) -> bool:
        """Whether ``epoch`` is a validation epoch."""
        return epoch % self.every == 0 or epoch == max_epochs

    def attach(self, trainer: Engine) -> Validation:
        """Validate at the trainer's record period (:func:`~handlers.ordering.run_period`): every ``every``
        epochs (and after the last), or at each of its iterations when it validates every N iterations."""
        self._by_iteration = by_iteration(trainer)
        attach_ordered(trainer, record_period(trainer), self, Stage.VALIDATION)
        return self

    def __call__(self, trainer: Engine) -> None:
        metrics = trainer.state.metrics
        for key in [k for k in metrics if k.startswith(self.prefix)]:
            del metrics[key]
        if not self._by_iteration and not self.is_due(trainer.state.epoch, trainer.state.max_epochs):
            return
        self.evaluator.run(self.loader)
        for name, value in self.evaluator.state.metrics.items():
            metrics[self.prefix + name] = value
        for setting, name in self.watched.items():
            if name not in metrics:
                raise ConfigError(f"{param(setting)} {name!r} is not a metric of this run; "
                                  f"it has: {', '.join(sorted(metrics))}")
