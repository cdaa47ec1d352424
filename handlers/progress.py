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

    The bar is refreshed every ``every`` iterations, so its cost per iteration stays negligible.
    """

    def __init__(self, every: int = 10) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.every = every
        self.train_bar = ProgressBar(persist=False)
        self.val_bar = ProgressBar(persist=False, desc="Validation")

    def attach(self, trainer: Engine, evaluator: Engine | None = None) -> "Progress":
        self.train_bar.attach(trainer, output_transform=lambda o: {"loss": o["loss"]},
                              event_name=Events.ITERATION_COMPLETED(every=self.every))
        if evaluator is not None:
            self.val_bar.attach(evaluator)
        return self
