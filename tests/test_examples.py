"""The examples and the README's own-model program, run as a user runs them: real processes."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests import forkserver
from tests.conftest import ROOT
from tests.docs_blocks import block

pytestmark = pytest.mark.slow
EXAMPLES = ROOT / "examples"
QUIET = ["--no-progress"]


def readme_program() -> str:
    """The README's own-model program, ``my_train.py``."""
    return block("my_train.py")


def run(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return forkserver.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env)


@pytest.mark.parametrize("name, limit", [("train_mnist.py", 150), ("train_cifar10.py", 100), ("train_text.py", 80)])
def test_examples_are_short_and_hold_no_run_machinery(name, limit):
    source = (EXAMPLES / name).read_text()
    assert len(source.splitlines()) <= limit
    for machinery in ("import signal", "torch.save", "torch.load", "ignite.distributed", "Checkpoint", "RunLock",
                      "find_resume", "sys.excepthook", "SIGTERM"):
        assert machinery not in source, machinery


def test_the_readme_text_example_is_the_script_and_trains_as_written(tmp_path):
    source = (EXAMPLES / "train_text.py").read_text()
    assert block("train_text.py") == source  # the docs' copy is the file
    proc = run(str(EXAMPLES / "train_text.py"), "--output-dir", str(tmp_path / "r"), *QUIET, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((tmp_path / "r" / "history.json").read_text())
    assert len(rows) == 5 and rows[-1]["val_accuracy"] > 0.9
    summary = json.loads((tmp_path / "r" / "config.json").read_text())["model_summary"]
    assert summary["input_shape"]["input_ids"][0] == 64


def test_the_readme_program_runs_as_written(tmp_path):
    code = readme_program()
    assert len(code.splitlines()) <= 40
    (tmp_path / "my_train.py").write_text(code)
    proc = run("my_train.py", "--output-dir", "runs/a", "--epochs", "2", *QUIET, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Epoch 2, Val Loss: " in proc.stdout and "Best val accuracy: " in proc.stdout
    out = tmp_path / "runs" / "a"
    rows = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["val_accuracy"] > 0.8
    assert list((out / "checkpoints").glob("best_*.pt")) and list((out / "tb").glob("events.out.tfevents.*"))
    bad = run("my_train.py", "--output-dir", "runs/a", "--epochs", "3", cwd=tmp_path)  # a run is there: no resume
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--resume auto" in bad.stderr


KILLABLE = '''
import os, sys, time
from ignite.engine import Events
import my_train
from handlers import cli, fit


class HoldAt:
    """At iteration ``at``: say so and wait there, for the test to SIGKILL the process."""

    def __init__(self, at):
        self.at = at

    def attach(self, trainer):
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=self.at), self)
        return self

    def __call__(self, engine):
        print(f"HOLDING at {engine.state.iteration}", flush=True)
        time.sleep(600)


def train(s):
    hold = [HoldAt(int(os.environ["HOLD_AT"]))] if os.environ.get("HOLD_AT") else []
    return fit(my_train.TinyNet(s.hidden), my_train.make_data(4096, 1), my_train.make_data(1024, 2), s, name="tiny",
               handlers=hold)


if __name__ == "__main__":
    parser = cli.run_parser("killable", my_train.Settings())
    parser.add_argument("--hidden", type=int)
    sys.exit(cli.main(train, parser, my_train.Settings))
'''


def test_a_custom_model_killed_mid_epoch_and_resumed_auto_equals_an_uninterrupted_run(tmp_path):
    (tmp_path / "my_train.py").write_text(readme_program())
    (tmp_path / "killable.py").write_text(KILLABLE)
    args = ["killable.py", "--epochs", "3", "--save-every-iters", "25", "--seed", "4", *QUIET]  # 128 batches an epoch
    assert run(*args, "--output-dir", "straight", cwd=tmp_path).returncode == 0
    proc = forkserver.popen([sys.executable, *args, "--output-dir", "killed"], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "HOLD_AT": "200"})
    for line in proc.stdout:
        if line.startswith("HOLDING at 200"):
            proc.kill()  # SIGKILL: no handler of ours runs
            break
    assert proc.wait(timeout=60) == -9
    resumed = run(*args, "--output-dir", "killed", "--resume", "auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resumed from" in resumed.stdout and "iteration 175)" in resumed.stdout  # mid-epoch 2 (128 an epoch)
    straight, killed = (json.loads((tmp_path / d / "history.json").read_text()) for d in ("straight", "killed"))
    timing = {"epoch_seconds", "samples_per_second"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in killed] == \
        [{k: v for k, v in r.items() if k not in timing} for r in straight]
    a, b = (torch.load(tmp_path / d / "checkpoints" / "last_iter=384.pt", weights_only=True)["model"]
            for d in ("straight", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("path", ["auto", "loader"])
def test_cifar10_example_on_synthetic_data_trains_with_crop_and_flip_and_shows_colour(tmp_path, path):
    out = tmp_path / "cifar"
    proc = run(str(EXAMPLES / "train_cifar10.py"), "--synthetic", "512", "--epochs", "2", "--batch-size", "128",
               "--val-batch-size", "128", "--width", "8", "--output-dir", str(out), "--data-path", path,
               "--num-workers", "2" if path == "loader" else "0", *QUIET, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads((out / "history.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["val_samples"] == 512
    config = json.loads((out / "config.json").read_text())
    assert (config["synthetic"], config["width"], config["data_path"], config["augment"]) == (512, 8, path, True)
    if path == "auto":  # on the device, per sample; the loader path: torchvision's transforms in the workers
        assert config["train_transform"] == "Compose(RandomCrop(padding=4), RandomHorizontalFlip(p=0.5))"
        acc = EventAccumulator(str(out / "tb"), size_guidance={"images": 0})
        acc.Reload()
        grid = acc.Images("val/misclassified")[-1]
        pixels = np.asarray(Image.open(io.BytesIO(grid.encoded_image_string)).convert("RGB")).astype(int)
        red, green, blue = pixels[..., 0], pixels[..., 1], pixels[..., 2]
        assert (red != green).mean() > 0.1 and (green != blue).mean() > 0.1  # colour, not one channel repeated
    else:
        assert "train_transform" not in config


def test_cifar10_missing_offline_is_one_line_and_exit_2(tmp_path):
    proc = run(str(EXAMPLES / "train_cifar10.py"), "--data-dir", str(tmp_path / "none"), "--no-download",
               "--output-dir", str(tmp_path / "r"), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(r"CIFAR10 not found in .*none.*cifar-10-batches-py", proc.stderr)
