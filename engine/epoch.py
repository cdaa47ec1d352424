"""Where the trainer stands in its epoch, also while a stream's first pass has not told its length."""

from __future__ import annotations

from typing import Any

__all__ = ["batch_in_epoch", "mid_epoch"]


def batch_in_epoch(state: Any) -> int:
    """Batches of the current epoch done (0 at an epoch boundary). While ``epoch_length`` is unknown
    (Ignite learns a stream's from its first pass) the run is in epoch 1: every iteration so far."""
    if state is None or not state.iteration:
        return 0
    return state.iteration % state.epoch_length if state.epoch_length else state.iteration


def mid_epoch(state: Any) -> bool:
    """Whether the trainer stopped inside an epoch (not at its end)."""
    return batch_in_epoch(state) != 0
