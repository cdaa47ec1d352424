"""Per-sample exact means, a short last batch included (the seed averaged per batch)."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from torch import nn

from engine import RunSettings, create_evaluator, create_trainer, default_metrics
from handlers import SampleCount, TrainMetrics, build_run, make_optimizer


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
