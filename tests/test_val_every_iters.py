"""Validation every N iterations (``--val-every-iters``) on the memory, loader and stream paths: a row of
history.json, an early-stopping judgement, a best checkpoint and console lines per validation; a run killed
with SIGKILL between two validations or during one resumes bit for bit (history included)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from engine import RunSettings
from handlers import fit, seed_everything
from handlers.checkpoint import SafeDiskSaver
from tests.test_run import Regressor, regression_data
from tests.test_user_data import assert_same_tensors, history, in_this_process, newest_state, program

pytestmark = pytest.mark.slow
EVERY = "3"  # 8 batches an epoch: validations at 3, 6, 9, ... and after the last iteration

# kill between two validations (an iteration after a checkpoint), or in the middle of one (at iteration 12):
# the memory path between, the DataLoader path (2 workers) during, the stream (2 workers) between
KILLED = [("fast", 0, ["--kill-at", "13"]), ("augment", 2, ["--kill-validating", "12"]),
          ("stream", 2, ["--kill-at", "11"])]


@pytest.mark.parametrize("kind, workers, kill", KILLED, ids=[f"{k}-{w}-{a[0][7:]}" for k, w, a in KILLED])
def test_a_run_validating_every_n_iterations_killed_and_resumed_equals_an_uninterrupted_one(tmp_path, kind, workers,
                                                                                            kill):
    args = ["--kind", kind, "--num-workers", str(workers), "--save-every-iters", "2", "--seed", "4",
            "--val-every-iters", EVERY, "--epochs", "2", "--deterministic"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = in_this_process(*args, "--output-dir", str(straight))
    assert done.returncode == 0, done.stderr
    rows = history(straight)
    length = 8  # the stream: 200 samples, 100 a worker, 4 batches each
    expected = [i for i in range(1, 2 * length + 1) if i % 3 == 0 or i == 2 * length]
    assert [r["iteration"] for r in rows] == expected  # one row per validation, with its epoch and iteration
    assert [r["epoch"] for r in rows] == [(i - 1) // length + 1 for i in expected]
    first = program(*args, "--output-dir", str(killed), *kill)
    assert first.returncode == -signal.SIGKILL, first.stderr
    resumed = program(*args, "--output-dir", str(killed), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert history(killed) == rows
    a, b = newest_state(straight), newest_state(killed)
    assert_same_tensors(a["model"], b["model"], "model")
    assert_same_tensors(a["optimizer"], b["optimizer"], "optimizer")
    best = json.loads((straight / "history.json").read_text())
    top = max(best, key=lambda r: r["val_accuracy"])
    names = sorted(p.name for p in (straight / "checkpoints").glob("best_*.pt"))
    assert f"best_epoch={top['epoch']}_iter={top['iteration']}_val_accuracy={top['val_accuracy']:.4f}.pt" in names


def test_early_stopping_counts_validations_and_the_console_names_each(tmp_path):
    seed_everything(1)
    settings = RunSettings(output_dir=str(tmp_path / "r"), epochs=3, batch_size=32, lr=1e-2, progress=False,
                           monitor="val_loss", mode="min", seed=1, val_every_iters=5, patience=2, min_delta=1e3,
                           log_every=0)
    result = fit(Regressor(), regression_data(640, 1), regression_data(200, 2), settings, classification=False)
    # 20 iterations an epoch; nothing improves by 1e3: judged at 5 (the first score), stopped at the third, 15
    assert result.exit_code == 0 and [r["iteration"] for r in result.history] == [5, 10, 15]
    assert result.best_path.name.startswith(f"best_epoch=1_iter={result.best['iteration']}_val_loss=")


def test_a_name_saved_again_keeps_its_file(tmp_path):
    """Ignite drops the old item of a name it saves again; the saver removes dropped files after the save, never
    the file just written under that name."""
    import torch

    saver = SafeDiskSaver(tmp_path)
    saver({"x": torch.ones(1)}, "last_iter=8.pt")
    saver.remove("last_iter=8.pt")
    saver({"x": torch.zeros(1)}, "last_iter=8.pt")
    assert torch.load(tmp_path / "last_iter=8.pt", weights_only=True)["x"].item() == 0.0


def test_the_readme_command_validates_every_n_steps(tmp_path):
    import os
    import subprocess
    import sys

    from tests.test_examples import readme_program

    (tmp_path / "my_train.py").write_text(readme_program())
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("python my_train.py --val-every-iters"))
    command = line.split("#")[0].split()[1:]  # as written, after "python"
    proc = subprocess.run([sys.executable, *command, "--epochs", "2", "--no-progress"], cwd=tmp_path, text=True,
                          capture_output=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "runs" / "tiny3" / "history.json").read_text())
    assert [r["iteration"] for r in rows] == [50, 100, 150, 200, 250, 256]  # 128 batches an epoch
    assert "Epoch 2, Iteration 250, Val Loss: " in proc.stdout
