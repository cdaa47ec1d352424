"""The run's guards on small engines: the NaN guard read every iteration (a CPU) or at a cadence (a GPU, where a
read waits for the step), and the host-side label check that keeps a bad label away from a GPU's kernels."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events

from engine import ConfigError, InMemoryLoader
from engine.batch import prepare_batch
from engine.checks import BatchError, LabelGuard
from handlers.nan_guard import NanGuard


def nan_run(check_every: int, bad_rows: list[int], lines: list[str]) -> tuple[Engine, NanGuard, InMemoryLoader]:
    """24 samples in batches of 4 (unshuffled); the loss is the batch's mean input: NaN where a row is."""
    x = torch.arange(24.0).unsqueeze(1)
    x[bad_rows] = float("nan")
    loader = InMemoryLoader(x, torch.zeros(24, dtype=torch.long), 4, shuffle=False)
    trainer = Engine(lambda e, batch: {"loss": batch[0].mean()})
    guard = NanGuard(log=lines.append, check_every=check_every, data=loader).attach(trainer)
    trainer.run(loader, max_epochs=1)
    return trainer, guard, loader


@pytest.mark.parametrize("check_every, stopped_at", [(1, 3), (4, 4)])  # the 3rd batch holds rows 9 and 10
def test_nan_inputs_stop_the_run_and_name_the_samples_whether_read_each_step_or_at_a_cadence(check_every,
                                                                                          stopped_at):
    lines: list[str] = []
    trainer, guard, _ = nan_run(check_every, [9, 10], lines)
    assert guard.triggered and guard.triggered_at == (1, 3) and trainer.state.iteration == stopped_at
    assert len(lines) == 1 and lines[0].startswith("Stopped: the training batch at epoch 1, iteration 3 holds NaN or "
                                                   "infinite inputs (sample(s) ")
    where = "1, 2 of the batch" if check_every == 1 else "9, 10 of the training set"  # read later: the set's rows
    assert f"(sample(s) {where})" in lines[0] and "the data is at fault" in lines[0]


def test_a_non_finite_loss_read_at_a_cadence_is_found_before_any_save():
    lines: list[str] = []
    x = torch.ones(24, 1)
    trainer = Engine(lambda e, batch: {"loss": torch.tensor(float("inf") if e.state.iteration == 2 else 1.0)})
    guard = NanGuard(log=lines.append, check_every=50).attach(trainer)
    asked = []
    # a save asks at iteration 3: the record is read then, between two reads of the cadence
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3), lambda e: asked.append(guard.triggered))
    trainer.run(InMemoryLoader(x, torch.zeros(24), 4, shuffle=False), max_epochs=1)
    assert asked == [True] and guard.triggered_at == (1, 2) and trainer.state.iteration == 3
    assert lines == ["Stopped: the training loss became non-finite at epoch 1, iteration 2 (seen at iteration 3: on "
                     "cpu it is read every 50 iterations); no checkpoint was written from this state (try a lower lr, "
                     "or clip_grad_norm)"]


def test_finite_losses_never_trigger_either_way():
    for every in (1, 3):
        _, guard, _ = nan_run(every, [], [])
        assert not guard.triggered


@pytest.mark.parametrize("labels, message", [
    ([0, 1, 2, 3], "the training set holds class 3, but the model has 3 outputs (classes 0 to 2)"),
    ([0, -2, 1, 1], "the training set holds class -2, but the model has 3 outputs (classes 0 to 2)"),
])  # fmt: skip
def test_a_label_out_of_range_is_one_line_before_the_copy(labels, message):
    guard = LabelGuard(prepare_batch, "training", 3)
    with pytest.raises(BatchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        guard((torch.zeros(4, 2), torch.tensor(labels)), torch.device("cpu"))


def test_labels_in_range_ignored_ones_and_other_shapes_pass_the_label_guard():
    guard = LabelGuard(prepare_batch, "training", 3, ignore_index=-100)
    x, y = guard((torch.zeros(4, 2), torch.tensor([0, 2, -100, 1])), torch.device("cpu"))
    assert y.tolist() == [0, 2, -100, 1]
    soft = guard((torch.zeros(2, 2), torch.rand(2, 3)), torch.device("cpu"))[1]
    assert soft.shape == (2, 3)  # soft labels: not class labels, passed as they are


def test_a_stream_s_label_guard_learns_the_classes_from_its_first_batch():
    seen = []
    guard = LabelGuard(prepare_batch, "training", None, probe=lambda batch: seen.append(batch) or 3)
    guard((torch.zeros(2, 2), torch.tensor([0, 1])), torch.device("cpu"))
    assert guard.classes == 3 and len(seen) == 1
    with pytest.raises(ConfigError, match="holds class 5"):
        guard((torch.zeros(2, 2), torch.tensor([5, 1])), torch.device("cpu"))
    with pytest.raises(ValueError, match="probe"):
        LabelGuard(prepare_batch, "training", None)
