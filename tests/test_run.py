"""The run API in-process on custom models: regression watching val_loss, a misspelled metric, exact
resume after a crash mid-epoch, custom handler state, signal handlers put back however a run ends."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from ignite.engine import Engine, Events
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from engine import ConfigError, RunSettings
from handlers import fit, load_checkpoint, seed_everything

TIMING_KEYS = {"epoch_seconds", "samples_per_second"}


class Regressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def regression_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.linspace(-1, 1, 8).unsqueeze(1)
    return x, x @ w + 0.05 * torch.randn(n, 1, generator=g)


def regress(tmp_path, name="run", handlers=(), **kw):
    base = dict(output_dir=str(tmp_path / name), epochs=3, batch_size=32, lr=1e-2, log_every=0, progress=False,
                monitor="val_loss", mode="min", seed=1)
    seed_everything(1)
    model = Regressor()
    result = fit(model, regression_data(640, 1), regression_data(200, 2), RunSettings(**{**base, **kw}),
                 classification=False, handlers=handlers)
    return result, model


def figures(rows):
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def test_regression_early_stopping_best_checkpoints_and_tensorboard_without_accuracy(tmp_path):
    result, _ = regress(tmp_path, epochs=8, patience=2, min_delta=1e3)  # nothing improves by 1e3: stop at 3
    assert result.exit_code == 0 and [r["epoch"] for r in result.history] == [1, 2, 3]
    assert not any("accuracy" in key for row in result.history for key in row)
    best = min(result.history, key=lambda r: r["val_loss"])
    assert result.best == best and result.best_path.name.startswith(f"best_epoch={best['epoch']}_val_loss=")
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]  # it does learn
    kept = sorted((tmp_path / "run" / "checkpoints").glob("best_*.pt"))
    kept_epochs = sorted(int(p.name.split("_")[1].split("=")[1]) for p in kept)
    assert kept_epochs == sorted(r["epoch"] for r in sorted(result.history, key=lambda r: r["val_loss"])[:2])
    acc = EventAccumulator(str(tmp_path / "run" / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss/val")] == [20, 40, 60] and acc.Tags()["images"] == []
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["monitor"], config["mode"]) == ("val_loss", "min")


def test_default_watch_without_classification_is_val_loss_min(tmp_path):
    result, _ = regress(tmp_path, epochs=2, monitor=None, mode=None)
    assert result.best == min(result.history, key=lambda r: r["val_loss"])
    assert "val_loss" in result.best_path.name


class Crash:
    """Raise at iteration ``at``, as a crashing process would stop there."""

    def __init__(self, at: int) -> None:
        self.at = at

    def attach(self, trainer: Engine) -> Crash:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=self.at), self)
        return self

    def __call__(self, engine: Engine) -> None:
        raise RuntimeError("crash")


def test_regression_resumed_after_a_crash_mid_epoch_equals_an_uninterrupted_run(tmp_path):
    straight, straight_model = regress(tmp_path, "straight", save_every_iters=5, patience=0)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError, match="crash"):
        regress(tmp_path, "crashed", handlers=[Crash(33)], save_every_iters=5, patience=0)  # 20 batches an epoch
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert load_checkpoint(tmp_path / "crashed" / "checkpoints" / "last_iter=30.pt")["trainer"]["iteration"] == 30
    resumed, resumed_model = regress(tmp_path, "crashed", save_every_iters=5, patience=0, resume="auto")
    assert figures(resumed.history) == figures(straight.history)
    a, b = straight_model.state_dict(), resumed_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_misspelled_monitor_stops_at_the_first_validation_naming_the_metrics(tmp_path):
    with pytest.raises(ConfigError, match=r"monitor 'val_acc' is not a metric of this run; it has: "
                                          r"train_accuracy, train_loss, val_accuracy, val_loss, val_samples"):
        seed_everything(0)
        x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
        fit(nn.Linear(4, 2), (x, y), (x, y), RunSettings(output_dir=str(tmp_path / "r"), monitor="val_acc",
                                                         batch_size=16, progress=False, log_every=0))
    assert not list((tmp_path / "r" / "checkpoints").glob("best_*.pt"))  # stopped before any decision
    again = fit(nn.Linear(4, 2), (x, y), (x, y), RunSettings(output_dir=str(tmp_path / "r"), resume="auto",
                                                             batch_size=16, progress=False, log_every=0, epochs=1))
    assert again.exit_code == 0  # the run folder was released


class Counter:
    """A stateful handler of the user's: counts iterations; its state rides in every checkpoint."""

    def __init__(self) -> None:
        self.count = 0

    def attach(self, trainer: Engine, evaluator: Engine) -> Counter:
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: setattr(self, "count", self.count + 1))
        return self

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]


def test_a_custom_handlers_state_is_saved_and_restored(tmp_path):
    first = Counter()
    regress(tmp_path, epochs=1, handlers=[first])
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last_iter=20.pt")
    assert saved["handler0_Counter"] == {"count": 20}
    second = Counter()
    regress(tmp_path, epochs=2, resume="auto", handlers=[second])
    assert second.count == 40


@pytest.mark.parametrize("patience", [0, 1])
def test_signal_handlers_are_put_back_when_a_run_completes_or_stops_early(tmp_path, patience):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    regress(tmp_path, epochs=4, patience=patience, min_delta=1e3)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


class Stream(torch.utils.data.IterableDataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y))


@pytest.mark.parametrize("form", ["tensors", "dataset", "stream"])
def test_limit_val_batches_validates_on_the_first_batches_only(tmp_path, form):
    vx, vy = regression_data(200, 2)
    val = {"tensors": (vx, vy), "stream": Stream(vx, vy),  # a Dataset that is not two tensors: the loader path
           "dataset": torch.utils.data.Subset(torch.utils.data.TensorDataset(vx, vy), range(200))}[form]
    settings = RunSettings(output_dir=str(tmp_path / form), epochs=2, batch_size=32, val_batch_size=30,
                           limit_val_batches=3, log_every=0, progress=False, tensorboard=False, seed=1)
    result = fit(Regressor(), regression_data(640, 1), val, settings, classification=False)
    assert result.exit_code == 0 and [row["val_samples"] for row in result.history] == [90, 90]
    with pytest.raises(ConfigError, match="limit_val_batches must be a positive integer, got 0"):
        RunSettings(limit_val_batches=0)


def _targets(kind: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and validation targets of ``kind``, and the validation labels the accuracy compares with."""
    labels = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()  # 3 classes
    if kind == "soft":  # mixup-like soft labels for training, class labels for validation
        return nn.functional.one_hot(labels, 3).float() * 0.8 + 0.2 / 3, labels
    bits = (x[:, :3] > 0).float() if kind == "multilabel" else (x[:, :1] > 0).float()
    return bits, bits


@pytest.mark.parametrize("kind, outputs, loss_fn", [
    ("soft", 3, None), ("multilabel", 3, nn.BCEWithLogitsLoss()), ("binary", 1, nn.BCEWithLogitsLoss()),
])  # fmt: skip
def test_soft_multilabel_and_binary_targets_get_the_accuracy_they_mean(tmp_path, kind, outputs, loss_fn):
    seed_everything(0)
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
    y, val_y = _targets(kind, x)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, outputs))
    result = fit(model, (x, y), (x, val_y), RunSettings(output_dir=str(tmp_path / "r"), epochs=4, lr=1e-2,
                                                        batch_size=32, progress=False, log_every=0),
                 loss_fn=loss_fn)  # fmt: skip
    with torch.no_grad():
        out = model(x)
    right = out.argmax(1) == val_y if kind == "soft" else (out > 0) == (val_y > 0.5)  # every label counts
    last = result.history[-1]
    assert last["val_accuracy"] == pytest.approx(right.float().mean().item()) and last["val_accuracy"] > 0.7
    assert 0.5 < last["train_accuracy"] <= 1
    acc = EventAccumulator(str(tmp_path / "r" / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert len(acc.Scalars("accuracy/val")) == 4
    assert any("confusion" in tag for tag in acc.Tags()["images"]) == (kind == "soft")  # labels: a matrix


def test_seeded_globals_draw_the_same_for_a_seed_and_put_the_generators_back():
    import random

    import numpy as np

    from engine.seeding import seeded_globals

    before = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    draws = []
    for seed in (5, 5, 6):
        with seeded_globals(seed, "cpu"):
            draws.append((torch.rand(3).tolist(), random.random(), float(np.random.rand())))
    assert draws[0] == draws[1] != draws[2]
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    assert (np.random.get_state()[1] == before[2]).all()


def test_cutmix_and_mixup_as_a_pair_transform_train_and_resume_exactly_after_a_crash(tmp_path, capsys):
    from torchvision.transforms import v2

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(192, 3, 8, 8, generator=g), torch.randint(0, 4, (192,), generator=g)

    def run(name: str, handlers=(), **kw):
        seed_everything(0)
        net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(), nn.Linear(288, 4))
        mix = v2.RandomChoice([v2.CutMix(num_classes=4), v2.MixUp(num_classes=4)])  # torch's global RNG
        return fit(net, (x, y), (x, y), RunSettings(output_dir=str(tmp_path / name), epochs=3, batch_size=32,
                                                    save_every_iters=4, progress=False, log_every=0,
                                                    tensorboard=False, deterministic=True, **kw),  # (for a GPU)
                   pair_transform=mix, handlers=handlers), net  # fmt: skip

    straight, straight_net = run("straight")
    with pytest.raises(RuntimeError, match="crash"):
        run("crashed", handlers=[Crash(10)])  # 6 batches an epoch: saved at 8, in epoch 2
    capsys.readouterr()
    resumed, resumed_net = run("crashed", resume="auto")
    assert "(epoch 2, 2 of its 6 batches done, iteration 8)" in capsys.readouterr().out
    assert figures(resumed.history) == figures(straight.history)
    a, b = straight_net.state_dict(), resumed_net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert 0 < straight.history[-1]["train_accuracy"] < 1  # soft targets, read by their most likely class


def test_a_best_checkpoint_of_a_loss_is_named_by_the_loss_as_it_is(tmp_path):
    result, _ = regress(tmp_path, epochs=3)
    best = min(result.history, key=lambda r: r["val_loss"])
    assert result.best_path.name == f"best_epoch={best['epoch']}_val_loss={best['val_loss']:.4f}.pt"
    assert all("=-" not in p.name for p in (tmp_path / "run" / "checkpoints").glob("best_*.pt"))
