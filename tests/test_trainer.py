"""The trainer's step is the seed's step; the options (AMP, accumulation, clipping) do what they say."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from engine import ConfigError, create_evaluator, create_trainer, resolve_device


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.3), nn.Linear(4 * 6 * 6, 10))


def batches(n: int, size: int = 16, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 8, 8, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def seed_loop(model: nn.Module, data, lr: float = 1e-3) -> None:
    """The seed's loop, written by hand."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    model.train()
    for images, labels in data:
        optimizer.zero_grad()
        outputs = model(images)
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()


def test_step_equals_hand_written_seed_loop():
    data = batches(7)
    reference, ours = tiny_model(), tiny_model()
    torch.manual_seed(123)
    seed_loop(reference, data)
    trainer = create_trainer(ours, torch.optim.Adam(ours.parameters(), lr=1e-3), nn.CrossEntropyLoss(), device="cpu")
    torch.manual_seed(123)  # same dropout masks
    trainer.run(data, max_epochs=1)
    for (name, a), b in zip(reference.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), name


def test_output_carries_what_metrics_need():
    model = tiny_model()
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), device="cpu")
    state = trainer.run(batches(2, size=5), max_epochs=1)
    out = state.output
    assert set(out) >= {"loss", "y_pred", "y", "batch_size"}
    assert out["batch_size"] == 5 and out["y_pred"].shape == (5, 10) and not out["y_pred"].requires_grad
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])


def test_accumulation_matches_one_big_batch():
    big = batches(1, size=32)
    halves = [(big[0][0][:16], big[0][1][:16]), (big[0][0][16:], big[0][1][16:])]
    a = nn.Linear(64, 10)
    b = copy.deepcopy(a)
    flat = lambda data: [(x.flatten(1), y) for x, y in data]  # noqa: E731
    t1 = create_trainer(a, torch.optim.SGD(a.parameters(), lr=0.5), nn.CrossEntropyLoss(), device="cpu")
    t2 = create_trainer(b, torch.optim.SGD(b.parameters(), lr=0.5), nn.CrossEntropyLoss(), device="cpu",
                        accumulation_steps=2)
    t1.run(flat(big), max_epochs=1)
    t2.run(flat(halves), max_epochs=1)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_clipping_bounds_the_update_and_reports_the_norm():
    model = nn.Linear(64, 10)
    before = copy.deepcopy(model)
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=1.0), nn.CrossEntropyLoss(),
                             device="cpu", clip_grad_norm=1e-3)
    x, y = batches(1, size=8)[0]
    state = trainer.run([(x.flatten(1) * 100, y)], max_epochs=1)
    assert state.output["grad_norm"] > 1e-3
    moved = torch.sqrt(sum(((p - q) ** 2).sum() for p, q in zip(model.parameters(), before.parameters())))
    assert moved <= 1e-3 * 1.0001


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains_on_cpu(amp):
    model = tiny_model()
    trainer = create_trainer(model, torch.optim.Adam(model.parameters()), nn.CrossEntropyLoss(), device="cpu", amp=amp)
    assert (trainer.scaler is not None) == (amp == "fp16")
    state = trainer.run(batches(3), max_epochs=2)
    assert torch.isfinite(state.output["loss"])
    evaluator = create_evaluator(model, {}, device="cpu", amp=amp)
    y_pred, _ = evaluator.run(batches(1)).output
    assert y_pred.dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"accumulation_steps": 0}, "accumulation_steps"),
        ({"clip_grad_norm": -1.0}, "clip_grad_norm"),
        ({"amp": "fp8"}, "mixed-precision"),
        ({"device": "tpu9"}, "device"),
    ],
)
def test_bad_options_are_refused_with_a_clear_message(kwargs, match):
    model = tiny_model()
    with pytest.raises(ConfigError, match=match):
        create_trainer(model, torch.optim.Adam(model.parameters()), nn.CrossEntropyLoss(),
                       **{"device": "cpu", **kwargs})


def test_device_auto_is_cpu_here_and_cuda_refused_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert resolve_device(None).type in ("cpu", "mps")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")
