"""Early stopping driven by scripted scores: no model needed."""

from __future__ import annotations

import math

import pytest
from ignite.engine import Engine, Events

from handlers import EarlyStopping


def drive(scores, **kwargs):
    """Run a trainer whose epoch e reports val_accuracy = scores[e-1]; return (epochs run, handler, lines)."""
    trainer = Engine(lambda e, b: None)
    lines: list[str] = []
    stopper = EarlyStopping(log=lines.append, **kwargs).attach(trainer)

    @trainer.on(Events.EPOCH_STARTED)
    def publish(engine):
        engine.state.metrics["val_accuracy"] = scores[engine.state.epoch - 1]

    state = trainer.run([0], max_epochs=len(scores))
    return state.epoch, stopper, lines


@pytest.mark.parametrize(
    "scores, kwargs, stopped_at",
    [
        ([0.5, 0.6, 0.7, 0.8, 0.9], {"patience": 1}, None),  # always improving: never stops
        ([0.9, 0.8, 0.8, 0.8, 0.95], {"patience": 3}, 4),  # three checks without improvement
        ([0.9, 0.8, 0.95, 0.8, 0.8], {"patience": 2}, 5),  # improvement resets the counter
        ([0.90, 0.905, 0.909, 0.95], {"patience": 2, "min_delta": 0.01}, 3),  # too small to count
        ([0.9, 0.8, 0.8, 0.8, 0.8], {"patience": 1, "warmup": 3}, 5),  # epochs 1-3 not judged
        ([0.9, 0.8, 0.8, 0.8, 0.8], {"patience": 0}, None),  # switched off
        ([0.9, math.nan, math.nan, 0.91], {"patience": 2}, 3),  # NaN is the worst, not an improvement
        ([math.nan, 0.5, 0.6, 0.7], {"patience": 1}, None),  # ... so anything finite beats it
        ([0.9, math.inf, 0.8, 0.8], {"patience": 2}, 3),  # inf is no improvement either
    ],
)
def test_stops_when_expected(scores, kwargs, stopped_at):
    epochs, stopper, lines = drive(scores, **kwargs)
    assert epochs == (stopped_at or len(scores))
    assert stopper.stopped_epoch == stopped_at
    if stopped_at is None:
        assert lines == []
    else:
        assert len(lines) == 1 and f"epoch {stopped_at}" in lines[0] and "val_accuracy" in lines[0]


def test_min_mode_for_a_loss():
    epochs, _, _ = drive([0.5, 0.4, 0.45, 0.46], patience=2, mode="min")
    assert epochs == 4


def test_state_round_trips_into_a_fresh_instance():
    _, stopper, _ = drive([0.9, 0.8, 0.85], patience=5)
    fresh = EarlyStopping(patience=5)
    fresh.load_state_dict(stopper.state_dict())
    assert (fresh.counter, fresh.best_score) == (2, 0.9)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"patience": -1}, "patience"), ({"min_delta": -0.1}, "min_delta"), ({"min_delta": math.nan}, "min_delta"),
     ({"warmup": -2}, "warmup"), ({"mode": "up"}, "mode")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EarlyStopping(**kwargs)
