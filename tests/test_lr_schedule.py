"""Each scheduler's LR curve, warm-up, plateau on validation accuracy, and resume of the curve."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events

from handlers import LRSchedule

EPOCH_LEN = 10


def run_curve(name, epochs=4, scores=None, state=None, stop_after=None, **kwargs):
    """LR used at each iteration (what the optimizer held during the step)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    trainer = Engine(lambda e, b: optimizer.param_groups[0]["lr"])
    schedule = LRSchedule(name, optimizer, epochs=epochs, epoch_length=EPOCH_LEN, **kwargs).attach(trainer)
    lrs: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: lrs.append(e.state.output))
    if scores is not None:
        @trainer.on(Events.EPOCH_STARTED)
        def publish(engine):
            engine.state.metrics["val_accuracy"] = scores[engine.state.epoch - 1]
    if stop_after:
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=stop_after), lambda e: e.terminate())
    trainer.run(range(EPOCH_LEN), max_epochs=epochs)
    return lrs, schedule, trainer, optimizer


def test_none_is_constant():
    lrs, *_ = run_curve("none")
    assert lrs == [0.1] * 40


def test_step_divides_by_ten_every_step_epochs():
    lrs, *_ = run_curve("step", step_epochs=1, gamma=0.1)
    for epoch in range(4):
        assert lrs[epoch * EPOCH_LEN: (epoch + 1) * EPOCH_LEN] == pytest.approx([0.1 * 0.1**epoch] * EPOCH_LEN)


def test_cosine_decreases_from_peak_to_near_zero():
    lrs, *_ = run_curve("cosine")
    assert lrs[0] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert lrs[-1] < 0.01


def test_onecycle_rises_then_falls():
    lrs, *_ = run_curve("onecycle", warmup_epochs=1)
    peak = lrs.index(max(lrs))
    assert peak == EPOCH_LEN and max(lrs) == pytest.approx(0.1)
    assert lrs[0] == pytest.approx(0.1 / 25)
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))
    assert lrs[-1] < 0.001


@pytest.mark.parametrize("name", ["none", "cosine", "step"])
def test_warmup_rises_linearly_to_the_peak(name):
    lrs, *_ = run_curve(name, warmup_epochs=1)
    assert lrs[0] == pytest.approx(0.001)
    assert all(a < b for a, b in zip(lrs[: EPOCH_LEN - 1], lrs[1:EPOCH_LEN]))
    assert max(lrs[EPOCH_LEN - 1: EPOCH_LEN + 1]) == pytest.approx(0.1)


def test_plateau_follows_validation_accuracy():
    lrs, *_ = run_curve("plateau", epochs=5, scores=[0.9, 0.95, 0.95, 0.95, 0.95], plateau_patience=1)
    per_epoch = [lrs[e * EPOCH_LEN] for e in range(5)]
    assert per_epoch == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.01])  # patience 1: one bad epoch is tolerated


def test_plateau_after_warmup_is_not_overridden():
    lrs, *_ = run_curve("plateau", epochs=4, scores=[0.9, 0.9, 0.9, 0.9], plateau_patience=1, warmup_epochs=1)
    assert lrs[0] == pytest.approx(0.001) and lrs[EPOCH_LEN] == pytest.approx(0.1)
    assert lrs[-1] == pytest.approx(0.01)


@pytest.mark.parametrize("name", ["step", "cosine", "onecycle", "plateau"])
def test_resumed_curve_continues_the_uninterrupted_one(name):
    scores = [0.9, 0.9, 0.9, 0.9]
    full, *_ = run_curve(name, scores=scores, step_epochs=1)
    first, schedule, trainer, optimizer = run_curve(name, scores=scores, step_epochs=1, stop_after=2)
    state, trainer_state, opt_state = schedule.state_dict(), trainer.state_dict(), optimizer.state_dict()
    optimizer2 = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    trainer2 = Engine(lambda e, b: optimizer2.param_groups[0]["lr"])
    schedule2 = LRSchedule(name, optimizer2, epochs=4, epoch_length=EPOCH_LEN, step_epochs=1).attach(trainer2)
    schedule2.load_state_dict(state)
    optimizer2.load_state_dict(opt_state)
    trainer2.load_state_dict(trainer_state)
    rest: list[float] = []
    trainer2.add_event_handler(Events.ITERATION_COMPLETED, lambda e: rest.append(e.state.output))
    trainer2.add_event_handler(Events.EPOCH_STARTED,
                               lambda e: e.state.metrics.__setitem__("val_accuracy", scores[e.state.epoch - 1]))
    trainer2.run(range(EPOCH_LEN), max_epochs=4)
    assert first[:20] + rest == pytest.approx(full)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"name": "linear"}, "unknown scheduler"), ({"warmup_epochs": 4}, "warmup_epochs"),
     ({"epochs": 0}, "epochs"), ({"step_epochs": 0}, "step_epochs")],
)
def test_bad_arguments(kwargs, match):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    args = {"name": "cosine", "epochs": 4, "epoch_length": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        LRSchedule(args.pop("name"), optimizer, **args)


def test_loading_another_schedulers_state_is_refused():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    state = LRSchedule("cosine", optimizer, epochs=2, epoch_length=5).state_dict()
    with pytest.raises(ValueError, match="scheduler='cosine'"):
        LRSchedule("step", optimizer, epochs=2, epoch_length=5).load_state_dict(state)
