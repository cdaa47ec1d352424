"""Handlers run by stage, whatever order they were attached in."""

from __future__ import annotations

import itertools

import pytest
from ignite.engine import Engine, Events

from handlers import Stage, attach_ordered, ordered_handlers


@pytest.mark.parametrize("order", list(itertools.permutations(range(4))))
def test_stage_order_is_independent_of_attach_order(order):
    trainer = Engine(lambda e, b: None)
    calls: list[str] = []
    stages = [(Stage.LOGGING, "log"), (Stage.CHECKPOINT, "save"), (Stage.DECISION, "stop"), (Stage.METRICS, "metric")]
    for i in order:
        stage, name = stages[i]
        attach_ordered(trainer, Events.EPOCH_COMPLETED, lambda e, n=name: calls.append(n), stage)
    trainer.run([0], max_epochs=1)
    assert calls == ["metric", "stop", "save", "log"]
    assert len(ordered_handlers(trainer, Events.EPOCH_COMPLETED)) == 4


def test_same_stage_keeps_attach_order_and_passes_args():
    trainer = Engine(lambda e, b: None)
    calls = []
    for tag in "abc":
        attach_ordered(trainer, Events.COMPLETED, lambda e, t: calls.append(t), Stage.LOGGING, tag)
    trainer.run([0], max_epochs=1)
    assert calls == ["a", "b", "c"]


def test_stage_must_be_a_stage():
    with pytest.raises(TypeError, match="Stage"):
        attach_ordered(Engine(lambda e, b: None), Events.COMPLETED, print, "late")
