"""Checkpoints: best-k retention, rotation, crash safety, safe loading, fallback, clear errors."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from torch import nn

from engine import CheckpointError, CheckpointSaveError
from handlers import TrainingCheckpoint, find_resume_checkpoint, load_checkpoint, restore


def make_run(tmp_path: Path, scores, n_saved=2, n_last=2, model=None):
    """A trainer whose epoch e reports val_accuracy = scores[e-1], checkpointing at each epoch end."""
    model = model or nn.Linear(3, 2)
    trainer = Engine(lambda e, b: None)

    @trainer.on(Events.EPOCH_STARTED)
    def publish(engine):
        engine.state.metrics["val_accuracy"] = scores[engine.state.epoch - 1]

    ckpt = TrainingCheckpoint(tmp_path, {"model": model, "trainer": trainer}, n_saved=n_saved, n_last=n_last)
    ckpt.attach(trainer)
    return trainer, ckpt, model


def names(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_best_k_and_last_rotation(tmp_path):
    trainer, ckpt, _ = make_run(tmp_path, [0.5, 0.9, 0.7, 0.95, 0.6])
    trainer.run(range(4), max_epochs=5)
    assert names(tmp_path) == [
        "best_epoch=2_val_accuracy=0.9000.pt",
        "best_epoch=4_val_accuracy=0.9500.pt",
        "last_iter=16.pt",
        "last_iter=20.pt",
    ]
    assert ckpt.best_path.name == "best_epoch=4_val_accuracy=0.9500.pt"
    assert ckpt.last_path.name == "last_iter=20.pt"


@pytest.mark.parametrize("scores, n_saved, kept, best", [
    ([0.5, 1.0, 1.0, 0.9], 1, [2], 2),
    ([0.5, 1.0, 1.0, 0.9], 2, [2, 3], 2),
    ([1.0, 1.0, 1.0], 2, [1, 2], 1),
    ([0.9, 1.0, 1.0, 1.0], 3, [2, 3, 4], 2),
])  # fmt: skip
def test_on_a_tie_the_first_epoch_is_the_best(tmp_path, scores, n_saved, kept, best):
    trainer, ckpt, _ = make_run(tmp_path, scores, n_saved=n_saved)
    trainer.run(range(2), max_epochs=len(scores))
    assert sorted(int(p.name.split("_")[1].split("=")[1]) for p in tmp_path.glob("best_*.pt")) == kept
    assert ckpt.best_path.name.startswith(f"best_epoch={best}_")


def test_files_load_with_weights_only_and_hold_the_model(tmp_path):
    trainer, _, model = make_run(tmp_path, [0.5])
    trainer.run(range(2), max_epochs=1)
    data = torch.load(tmp_path / "last_iter=2.pt", weights_only=True)
    assert torch.equal(data["model"]["weight"], model.weight)
    assert data["trainer"]["iteration"] == 2 and data["meta"]["format"] == "ignite-trainer-checkpoint"


@pytest.mark.parametrize("score", [float("nan"), float("inf")])
def test_non_finite_score_never_becomes_best(tmp_path, score):
    trainer, _, _ = make_run(tmp_path, [0.5, score])
    trainer.run(range(2), max_epochs=2)
    assert [n for n in names(tmp_path) if n.startswith("best")] == ["best_epoch=1_val_accuracy=0.5000.pt"]


def test_non_finite_model_is_never_saved(tmp_path):
    trainer, _, model = make_run(tmp_path, [0.5, 0.9])
    trainer.add_event_handler(Events.EPOCH_STARTED(once=2), lambda e: model.weight.data.fill_(float("nan")))
    trainer.run(range(2), max_epochs=2)
    assert names(tmp_path) == ["best_epoch=1_val_accuracy=0.5000.pt", "last_iter=2.pt"]


def test_exception_inside_saving_keeps_the_previous_file_and_no_temp(tmp_path, monkeypatch):
    trainer, ckpt, _ = make_run(tmp_path, [0.5, 0.6, 0.7], n_saved=1, n_last=1)
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj, f, **kw):
        calls["n"] += 1
        if trainer.state.epoch == 2:
            f.write(b"half a file")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, **kw)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CheckpointSaveError, match=r"No space left on device.*last_iter=2.pt is intact"):
        trainer.run(range(2), max_epochs=3)
    assert names(tmp_path) == ["best_epoch=1_val_accuracy=0.5000.pt", "last_iter=2.pt"]
    assert load_checkpoint(tmp_path / "last_iter=2.pt")["trainer"]["iteration"] == 2


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_auto_resume_falls_back_past_a_damaged_newest_file(tmp_path, damage):
    trainer, _, _ = make_run(tmp_path, [0.5, 0.6])
    trainer.run(range(3), max_epochs=2)
    newest = tmp_path / "last_iter=6.pt"
    raw = newest.read_bytes()
    newest.write_bytes({"truncate": raw[: len(raw) // 2], "empty": b"", "garbage": os.urandom(500)}[damage])
    lines: list[str] = []
    path, data = find_resume_checkpoint(tmp_path, log=lines.append)
    assert path.name == "last_iter=3.pt" and data["trainer"]["iteration"] == 3
    assert len(lines) == 1 and "last_iter=6.pt" in lines[0]
    with pytest.raises(CheckpointError, match="last_iter=6.pt"):
        load_checkpoint(newest)


def test_no_valid_checkpoint_at_all_is_an_error_naming_the_folder(tmp_path):
    (tmp_path / "last_iter=5.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        find_resume_checkpoint(tmp_path, log=lambda s: None)
    assert find_resume_checkpoint(tmp_path / "nothing-here") is None


class Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/pwned-by-checkpoint",))


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(tmp_path):
    target = Path("/tmp/pwned-by-checkpoint")
    target.unlink(missing_ok=True)
    path = tmp_path / "last_iter=1.pt"
    with open(path, "wb") as f:
        pickle.dump({"meta": {"format": "ignite-trainer-checkpoint", "version": 1}, "model": Boom()}, f)
    torch.save({"model": Boom()}, tmp_path / "evil2.pt")
    for p in (path, tmp_path / "evil2.pt"):
        with pytest.raises(CheckpointError, match="cannot be read"):
            load_checkpoint(p)
    assert not target.exists()


def test_a_foreign_file_is_not_a_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(tmp_path / "x.pt")


def test_another_models_checkpoint_names_the_tensor(tmp_path):
    trainer, _, _ = make_run(tmp_path, [0.5], model=nn.Linear(3, 2))
    trainer.run(range(1), max_epochs=1)
    data = load_checkpoint(tmp_path / "last_iter=1.pt")
    with pytest.raises(CheckpointError, match=r"tensor 'weight' has shape \(2, 3\), this model needs \(4, 3\)"):
        restore({"model": nn.Linear(3, 4)}, data, "last_iter=1.pt")


def test_bookkeeping_survives_a_resume(tmp_path):
    trainer, _, model = make_run(tmp_path, [0.9, 0.5, 0.6, 0.95])
    trainer.add_event_handler(Events.EPOCH_COMPLETED(once=2), lambda e: e.terminate())
    trainer.run(range(2), max_epochs=4)
    path, data = find_resume_checkpoint(tmp_path)
    trainer2, ckpt2, model2 = make_run(tmp_path, [0.9, 0.5, 0.6, 0.95])
    restore({"model": model2, "trainer": trainer2}, data, path)
    ckpt2.load_bookkeeping(data, path)
    trainer2.run(range(2), max_epochs=4)
    assert names(tmp_path) == [
        "best_epoch=1_val_accuracy=0.9000.pt",
        "best_epoch=4_val_accuracy=0.9500.pt",
        "last_iter=6.pt",
        "last_iter=8.pt",
    ]
