"""Per-sample exact means, a short last batch included (the seed averaged per batch)."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn

from engine import RunSettings, create_evaluator, create_trainer, default_metrics
from handlers import ConsoleLogger, SampleCount, TrainMetrics, build_run, make_optimizer
from handlers.metrics import _GROUP_BATCHES


def data(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in sizes]


@pytest.mark.parametrize("sizes", [[64, 64, 7], [1000, 1000, 1], [5]])
def test_evaluator_gives_exact_per_sample_means(sizes):
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    batches = data(sizes)
    evaluator = create_evaluator(model, {**default_metrics(nn.CrossEntropyLoss()), "n": SampleCount()}, device="cpu")
    metrics = evaluator.run(batches).metrics
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        logits = model(x)
    expected_loss = nn.functional.cross_entropy(logits, y, reduction="sum").item() / len(y)
    expected_acc = (logits.argmax(1) == y).sum().item() / len(y)
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert metrics["accuracy"] == pytest.approx(expected_acc, abs=1e-12)
    assert metrics["n"] == sum(sizes)
    per_batch = sum(nn.functional.cross_entropy(model(b[0]), b[1]).item() for b in batches) / len(batches)
    if len(sizes) > 1:
        assert abs(per_batch - expected_loss) > 1e-4  # the seed's per-batch mean would differ


def test_train_metrics_are_per_sample_means_of_the_steps_losses():
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    batches = data([10, 10, 3])
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.0), nn.CrossEntropyLoss(), device="cpu")
    TrainMetrics().attach(trainer)
    metrics = trainer.run(batches, max_epochs=1).metrics
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    with torch.no_grad():
        logits = model(x)
    assert metrics["train_loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-6)
    assert metrics["train_accuracy"] == pytest.approx((logits.argmax(1) == y).float().mean().item())


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_train_loss_is_the_plain_cross_entropy_when_the_step_smooths_labels(smoothing):
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    batches = data([10, 10, 3])
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.0),
                             nn.CrossEntropyLoss(label_smoothing=smoothing), device="cpu")
    TrainMetrics(loss_fn=nn.CrossEntropyLoss()).attach(trainer)
    seen = []  # the step's own (smoothed) losses
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.output["loss"].item()))
    metrics = trainer.run(batches, max_epochs=1).metrics
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    with torch.no_grad():
        plain = nn.functional.cross_entropy(model(x), y).item()
    assert metrics["train_loss"] == pytest.approx(plain, rel=1e-6)
    stepped = sum(v * len(b[1]) for v, b in zip(seen, batches)) / len(y)
    assert (abs(stepped - plain) > 1e-3) == bool(smoothing)  # what TrainMetrics() alone would have reported


def test_make_optimizer_gives_adam_the_settings_betas():
    model = nn.Linear(2, 2)
    for name in ("adam", "adamw"):
        opt = make_optimizer(RunSettings(optimizer=name, beta1=0.7, beta2=0.9), model)
        assert opt.param_groups[0]["betas"] == (0.7, 0.9)
    assert make_optimizer(RunSettings(), model).param_groups[0]["betas"] == (0.9, 0.999)  # torch's defaults


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_fit_reports_the_plain_cross_entropy_whatever_the_smoothing(tmp_path, smoothing):
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    settings = RunSettings(output_dir=str(tmp_path), epochs=1, batch_size=8, label_smoothing=smoothing,
                           progress=False, tensorboard=False)
    run = build_run(nn.Linear(6, 3), (x, y), (x, y), settings)
    try:
        result = run.run()
    finally:
        run.close()
    assert result.exit_code == 0
    train_fn = run.train_metrics.metrics["loss"]._loss_fn  # the step's own loss, or the plain cross-entropy
    logits, targets = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    if smoothing:
        assert float(train_fn(logits, targets)) == pytest.approx(float(nn.functional.cross_entropy(logits, targets)))
    else:  # the step's loss passes through as it is
        assert train_fn(logits, targets) is logits


def outputs(sizes, classes=3, seed=0, length=None):
    """What a trainer step hands the metrics: the batch's mean loss, detached logits, targets."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, n in enumerate(sizes):
        shape = (n, classes) if length is None else (n, classes, length + k % 3)  # sequences of several lengths
        logits, y = torch.randn(*shape, generator=g), torch.randint(0, classes, (shape[0], *shape[2:]), generator=g)
        out.append({"loss": nn.functional.cross_entropy(logits, y), "y_pred": logits, "y": y})
    return out


def feed(batches, metrics, *, every=None, stop_at=None, start_at=0):
    """Run ``metrics`` (TrainMetrics, attached) over the outputs as one epoch; optionally look at the
    running means every ``every`` batches, or stop after ``stop_at`` and return the state then.
    ``start_at``: resume the epoch after that many iterations (Ignite's own mid-epoch resume), the
    batches given being the rest of it."""
    trainer = Engine(lambda engine, batch: batch)
    if start_at:
        trainer.load_state_dict({"iteration": start_at, "epoch_length": start_at + len(batches), "max_epochs": 1})
    metrics.attach(trainer)
    seen = {}
    if every:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=every), lambda e: seen.update(metrics.running()))
    if stop_at:
        @trainer.on(Events.ITERATION_COMPLETED(once=stop_at))
        def _stop(engine):
            seen["state"] = metrics.state_dict()
            engine.terminate()
    trainer.run(batches, max_epochs=1)
    return trainer.state.metrics, seen


@pytest.mark.parametrize("loss_fn", [None, nn.CrossEntropyLoss()])
@pytest.mark.parametrize("sizes", [[10] * 37 + [3], [7], [16] * 16, [2000] * 3])
def test_grouped_updates_give_the_per_sample_means_of_all_batches(sizes, loss_fn):
    batches = outputs(sizes)
    metrics, _ = feed(batches, TrainMetrics(loss_fn=loss_fn))
    logits, y = torch.cat([b["y_pred"] for b in batches]), torch.cat([b["y"] for b in batches])
    assert metrics["train_loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-6)
    assert metrics["train_accuracy"] == (logits.argmax(1) == y).sum().item() / len(y)


def test_outputs_of_other_shapes_close_the_group_and_still_count():
    batches = outputs([4] * 20, length=5)  # (4, 3, 5..7) logits: three shapes in turn
    metrics, _ = feed(batches, TrainMetrics(loss_fn=nn.CrossEntropyLoss()))
    correct = sum((b["y_pred"].argmax(1) == b["y"]).sum().item() for b in batches)
    assert metrics["train_accuracy"] == correct / sum(b["y"].numel() for b in batches)
    expected = sum(b["loss"].item() * len(b["y"]) for b in batches) / 80
    assert metrics["train_loss"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("loss_fn", [None, nn.CrossEntropyLoss()])
def test_looking_at_the_running_means_changes_no_bit_of_the_result(loss_fn):
    batches = outputs([10] * 41 + [5])
    alone, _ = feed(batches, TrainMetrics(loss_fn=loss_fn))
    looked, seen = feed(batches, TrainMetrics(loss_fn=loss_fn), every=7)
    assert looked == alone
    y = torch.cat([b["y"] for b in batches])  # the last look: after batch 42, all of them held back (up to 64 are)
    assert seen["train_accuracy"] == (torch.cat([b["y_pred"] for b in batches]).argmax(1) == y).sum().item() / len(y)


@pytest.mark.parametrize("loss_fn", [None, nn.CrossEntropyLoss()])
def test_a_line_at_the_flush_cadence_finds_nothing_held_back(loss_fn):
    batches = outputs([10] * 41 + [5])
    plain, _ = feed(batches, TrainMetrics(loss_fn=loss_fn))
    metrics = TrainMetrics(loss_fn=loss_fn, flush_every=7)
    looked, seen = feed(batches, metrics, every=7)
    assert looked["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-6)
    assert looked["train_accuracy"] == plain["train_accuracy"]
    assert not metrics._group  # the last look, after batch 42: the group had just been closed
    logits, y = torch.cat([b["y_pred"] for b in batches]), torch.cat([b["y"] for b in batches])
    assert seen["train_accuracy"] == (logits.argmax(1) == y).sum().item() / len(y)
    if loss_fn is not None:
        assert seen["train_loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-6)
    with pytest.raises(TypeError, match="flush_every"):
        TrainMetrics(flush_every=-1)


def console_lines(batches, flush_every, epochs=2):
    """The console's batch lines over ``epochs`` epochs, each with how many batches were held back then."""
    metrics, lines = TrainMetrics(flush_every=flush_every), []
    trainer = Engine(lambda engine, batch: batch)
    metrics.attach(trainer)
    ConsoleLogger(metrics, log_every=4, write=lambda line: lines.append((line, len(metrics._group)))).attach(trainer)
    trainer.run(batches, max_epochs=epochs)
    return [line for line, _ in lines if "Batch" in line], [held for line, held in lines if "Batch" in line]


def test_the_consoles_lines_in_every_epoch_find_nothing_held_back_and_read_alike():
    batches = outputs([10] * 9 + [3])  # epochs of 10 batches: lines at batches 4 and 8 of each
    plain, held_plain = console_lines(batches, flush_every=0)
    flushed, held = console_lines(batches, flush_every=4)
    assert held_plain == [4, 8, 4, 8] and held == [0, 0, 0, 0]  # in epoch 2 too (iteration 14 is its batch 4)
    assert flushed == plain and len(plain) == 4


@pytest.mark.parametrize("flush_every", [0, 10])
@pytest.mark.parametrize("stop_at", [5, 16, 23, 64, 70])
def test_a_resume_from_mid_group_sums_to_the_last_bit(stop_at, flush_every):
    batches = outputs([10] * 80)
    straight, _ = feed(batches, TrainMetrics(flush_every=flush_every))
    _, seen = feed(batches, TrainMetrics(flush_every=flush_every), stop_at=stop_at)
    state = seen["state"]
    held = stop_at % (flush_every or _GROUP_BATCHES)
    assert state["mid_epoch"] and len(state["held_back"][0]) == held  # one list per rank
    resumed = TrainMetrics(flush_every=flush_every)
    resumed.load_state_dict(state)
    rest, _ = feed(batches[stop_at:], resumed, start_at=stop_at)
    assert rest == straight


def test_held_back_targets_are_saved_in_their_own_storage():
    targets = torch.randint(0, 3, (10_000,))  # the batches' targets are slices of it, as a user's loader may give
    batches = [{"loss": torch.tensor(1.0), "y_pred": torch.randn(10, 3), "y": targets[10 * k:10 * k + 10]}
               for k in range(3)]
    _, seen = feed(batches, TrainMetrics(), stop_at=2)
    held = seen["state"]["held_back"][0]
    assert [h["y"].untyped_storage().nbytes() for h in held] == [10 * 8, 10 * 8]
    assert all(torch.equal(h["y"], b["y"]) for h, b in zip(held, batches))


def test_the_history_is_the_same_to_the_bit_whatever_prints_it_and_how_often(tmp_path):
    # the console's cadence (every batch, 20, 50, never) and the progress bar must not touch the sums
    from engine import RunSettings
    from handlers import fit, seed_everything

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1300, 10, generator=g)
    y = (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 1).long()
    rows = {}
    for every, bar in ((1, False), (20, True), (50, False), (0, False)):
        seed_everything(0)
        settings = RunSettings(output_dir=str(tmp_path / f"e{every}"), epochs=2, batch_size=16, lr=1e-2,
                               log_every=every, progress=bar, tensorboard=False)
        result = fit(torch.nn.Linear(10, 3), (x[:1000], y[:1000]), (x[1000:], y[1000:]), settings)
        rows[every] = [{k: v for k, v in r.items() if k not in ("epoch_seconds", "samples_per_second")}
                       for r in result.history]
    assert rows[1] == rows[20] == rows[50] == rows[0]
    assert rows[0][0]["train_loss"] != rows[0][1]["train_loss"]  # (figures that moved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sizes", [[64] * 50, [64] * 49 + [17], [1, 3, 5]])
def test_a_groups_loss_sum_is_the_per_step_products_to_the_bit(dtype, sizes):
    from handlers.metrics import _weighted_sum

    g = torch.Generator().manual_seed(0)
    group = [((torch.rand((), generator=g) * 3).to(dtype), None, torch.zeros(n)) for n in sizes]
    one_a_step = torch.stack([loss * len(y) for loss, _, y in group]).sum()
    grouped = _weighted_sum(group)
    assert grouped.dtype == one_a_step.dtype and torch.equal(grouped, one_a_step)


def test_only_items_alike_past_the_batch_share_a_signature():
    from handlers.metrics import _signature

    item = (torch.tensor(0.5), torch.randn(8, 3), torch.zeros(8, dtype=torch.long))
    assert _signature(item) == _signature((torch.tensor(0.1), torch.randn(5, 3), torch.ones(5, dtype=torch.long)))
    for other in [(torch.tensor(0.5), torch.randn(8, 4), item[2]), (torch.tensor(0.5), item[1].double(), item[2]),
                  (torch.tensor(0.5), item[1], item[2].float()), (torch.tensor(0.5), item[1], item[2][:, None])]:
        assert _signature(other) != _signature(item)
    for never in [(0.5, item[1], item[2]), (torch.tensor([0.5]), item[1], item[2]), (torch.tensor(0.5), item[1], 3)]:
        assert _signature(never) is None


def test_the_default_consoles_lines_find_the_group_just_closed():
    lines, held = [], []
    metrics = TrainMetrics()
    trainer = Engine(lambda engine, batch: batch)
    metrics.attach(trainer)
    ConsoleLogger(metrics, write=lambda line: (lines.append(line), held.append(len(metrics._group)))).attach(trainer)
    trainer.run(outputs([10] * 120), max_epochs=1)  # the default --log-every: lines at batches 50 and 100
    assert [line.split(",")[1] for line in lines if "Batch" in line] == [" Batch 50", " Batch 100"]
    assert held[:2] == [0, 0]  # nothing to copy: the running means are the metrics' own
