"""tqdm progress bars (Ignite's ``ProgressBar``) over each training epoch and each validation."""

from __future__ import annotations

import sys
from typing import TextIO

import ignite.distributed as idist
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar

__all__ = ["Progress", "progress_wanted"]


def progress_wanted(disabled: bool, stream: TextIO | None = None) -> bool:
    """Bars only on rank 0, when not switched off, and when the stream is a terminal (not a pipe or file)."""
    stream = stream if stream is not None else sys.stderr
    return not disabled and idist.get_rank() == 0 and hasattr(stream, "isatty") and stream.isatty()


class Progress:
    """A bar over each training epoch showing the batch loss, and one over each validation.

    The bar is refreshed every ``every`` iterations, so its cost per iteration stays negligible; the
    loss it shows is read every ``loss_every`` iterations (default: as often as the bar moves). On a
    GPU the run reads it at the console's cadence: a read makes the host wait for the step.
    """

    def __init__(self, every: int = 10, loss_every: int | None = None) -> None:
        for name, value in (("every", every), ("loss_every", every if loss_every is None else loss_every)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.every = every
        self.loss_every = every if loss_every is None else loss_every
        self.train_bar = ProgressBar(persist=False)
        self.val_bar = ProgressBar(persist=False, desc="Validation")
        self._shown: dict[str, float] = {}

    def attach(self, trainer: Engine, evaluator: Engine | None = None) -> Progress:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=self.loss_every), self._read_loss)
        self.train_bar.attach(trainer, output_transform=lambda _: self._shown,
                              event_name=Events.ITERATION_COMPLETED(every=self.every))
        if evaluator is not None:
            self.val_bar.attach(evaluator)
        return self

    def _read_loss(self, engine: Engine) -> None:
        self._shown = {"loss": float(engine.state.output["loss"])}
