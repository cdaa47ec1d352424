"""A user's own LR scheduler (OneCycleLR per step, StepLR per epoch) through ``fit``, killed with SIGKILL right after
a mid-epoch checkpoint and resumed: bit for bit the uninterrupted run; the ``lr`` of history.json and
TensorBoard is the one each step used (the scheduler's own ``get_last_lr()`` before the step); TensorBoard
keeps every step up to the checkpoint after the kill, and the resumed curves have no gap and no duplicate.
Also: accumulation's last window of an epoch, and dense predictions' confusion counts."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from engine import create_trainer
from handlers.confusion import MisclassifiedCollector
from tests import forkserver
from tests.conftest import in_process
from tests.docs_blocks import block
from tests.test_train_mnist import figures

PROGRAM = '''
import json, os, signal, sys
from dataclasses import dataclass

import torch
from ignite.engine import Events
from torch import nn

from engine import RunSettings
from handlers import cli, fit


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g)
    return x, (x[:, :3].sum(1) > 0).long() + (x[:, 3] > 0.5).long()


@dataclass
class Settings(RunSettings):
    epochs: int = 3
    batch_size: int = 32
    sched: str = "onecycle"
    kill_at: int = 0
    record: str = ""


class Spy:  # records the LR each step uses, as the scheduler itself says it, and kills the run when told
    def __init__(self, s, held):
        self.s, self.held = s, held

    def attach(self, trainer):
        trainer.add_event_handler(Events.ITERATION_STARTED, self.before_step)
        trainer.add_event_handler(Events.ITERATION_STARTED, self.after)

    def before_step(self, engine):
        with open(self.s.record, "a") as f:
            f.write(json.dumps([engine.state.iteration, self.held["s"].get_last_lr()[0]]) + "\\n")

    def after(self, engine):  # as the next iteration starts: every handler of kill_at, its checkpoint too, has run
        if self.s.kill_at and engine.state.iteration == self.s.kill_at + 1:
            os.kill(os.getpid(), signal.SIGKILL)


def train(s):
    held = {}
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 3))
    if s.sched == "onecycle":
        make, interval = (lambda opt: held.setdefault("s", torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=0.05, total_steps=s.epochs * 20))), "step"
    else:
        make, interval = (lambda opt: held.setdefault("s", torch.optim.lr_scheduler.StepLR(
            opt, step_size=1, gamma=0.5))), "epoch"
    return fit(model, data(640, 1), data(256, 2), s, name="own", lr_scheduler=make, lr_scheduler_interval=interval,
               handlers=[Spy(s, held)])


def main(argv=None):
    parser = cli.run_parser("A user's own scheduler.", Settings())
    parser.add_argument("--sched")
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--record")
    return cli.main(train, parser, Settings, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
'''
ARGS = ["--save-every-iters", "5", "--log-every", "1", "--no-progress", "--seed", "3"]


def run(tmp_path: Path, *args: str) -> tuple[int, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = forkserver.run([sys.executable, str(tmp_path / "own.py"), *ARGS, *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    return proc.returncode, proc.stdout + proc.stderr


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
            if not tag.startswith(("time/", "hparam/"))}


def used(record: Path) -> dict[int, float]:
    """The LR each iteration's step used, by the scheduler's own account (the last record of an iteration wins:
    the resumed run records the iterations after its checkpoint again)."""
    return {int(i): lr for i, lr in (json.loads(line) for line in record.read_text().splitlines())}


@pytest.mark.slow
@pytest.mark.parametrize("sched, kill_at", [("onecycle", 25), ("step", 30)])
def test_own_scheduler_killed_after_a_mid_epoch_checkpoint_resumes_exactly_and_logs_the_lr_each_step_used(
        tmp_path, sched, kill_at):  # fmt: skip
    (tmp_path / "own.py").write_text(PROGRAM)
    spec = importlib.util.spec_from_file_location(f"own_{sched}", tmp_path / "own.py")  # the straight run here
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    done = in_process(module.main, [*ARGS, "--output-dir", str(tmp_path / "straight"), "--sched", sched,
                                    "--record", str(tmp_path / "straight.jsonl")])
    assert done.returncode == 0, done.stderr
    code, out = run(tmp_path, "--output-dir", "killed", "--sched", sched, "--record", "killed.jsonl",
                    "--kill-at", str(kill_at))
    assert code == -signal.SIGKILL, out
    killed_points = scalars(tmp_path / "killed")  # before the resume: every step up to the checkpoint is there
    assert [s for s, _ in killed_points["loss/train_step"]][:kill_at] == list(range(1, kill_at + 1))
    code, out = run(tmp_path, "--output-dir", "killed", "--sched", sched, "--record", "killed.jsonl",
                    "--resume", "auto")
    assert code == 0, out
    assert f"Resumed from killed/checkpoints/last_iter={kill_at}.pt" in out
    straight, killed = (json.loads((tmp_path / d / "history.json").read_text()) for d in ("straight", "killed"))
    assert figures(killed) == figures(straight)
    weights = [torch.load(sorted((tmp_path / d / "checkpoints").glob("last_iter=60.pt"))[0], weights_only=True)
               for d in ("straight", "killed")]
    assert all(torch.equal(weights[0]["model"][k], weights[1]["model"][k]) for k in weights[0]["model"])
    lrs = used(tmp_path / "straight.jsonl")
    assert used(tmp_path / "killed.jsonl") == lrs
    assert [row["lr"] for row in straight] == pytest.approx([lrs[20], lrs[40], lrs[60]], rel=1e-6)  # epochs' last
    points = scalars(tmp_path / "killed")
    assert points == scalars(tmp_path / "straight")  # no gap, no duplicate, the same values
    assert [step for step, _ in points["lr"]] == list(range(1, 61))
    assert [lr for _, lr in points["lr"]] == pytest.approx([lrs[i] for i in range(1, 61)], rel=1e-6)


def test_an_epochs_last_window_of_accumulation_is_stepped_by_its_own_size():
    """5 batches an epoch, windows of 2: the fifth batch's gradient steps alone, at full weight (not halved,
    not dropped), as one window of 1 would; the next epoch starts a new window."""
    torch.manual_seed(0)
    batches = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(5)]
    model = nn.Linear(6, 3)
    reference = copy.deepcopy(model)
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), device="cpu",
                             accumulation_steps=2)
    trainer.run(batches, max_epochs=2)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(2):
        for window in (batches[0:2], batches[2:4], batches[4:5]):
            opt.zero_grad()
            for x, y in window:
                (nn.functional.cross_entropy(reference(x), y) / len(window)).backward()
            opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_a_streams_first_pass_of_unknown_length_steps_its_last_window_too():
    torch.manual_seed(1)
    batches = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(5)]

    def stream():  # no len(): Ignite learns the epoch's length at its end
        yield from batches

    model = nn.Linear(6, 3)
    reference = copy.deepcopy(model)
    trainer = create_trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), device="cpu",
                             accumulation_steps=2)
    steps = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: steps.append(e.state.iteration))
    trainer.run(stream(), max_epochs=1)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for window in (batches[0:2], batches[2:4], batches[4:5]):
        opt.zero_grad()
        for x, y in window:
            (nn.functional.cross_entropy(reference(x), y) / len(window)).backward()
        opt.step()
    assert steps == [5]
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


class _State:
    def __init__(self, output):
        self.output = output


class _Engine:
    def __init__(self, output):
        self.state = _State(output)


def test_dense_predictions_count_every_pixel():
    collector = MisclassifiedCollector()
    logits = torch.zeros(2, 3, 4, 5)
    logits[:, 1] = 1.0  # every pixel predicted class 1
    target = torch.randint(0, 3, (2, 4, 5))
    target[0, 0, 0] = -100  # ignored
    collector.reset()
    collector.update(_Engine((logits, target)))
    collector._reduce(None)
    counts = collector.confusion
    assert counts.shape == (3, 3) and int(counts.sum()) == 2 * 4 * 5 - 1
    assert counts[:, 1].tolist() == [int((target == c).sum()) for c in range(3)]
    assert collector.images == []


def readme_schedule_program() -> str:
    """The docs' own-scheduler program (handlers.md), ``own_schedule.py``."""
    return block("own_schedule.py")


@pytest.mark.slow
def test_the_readme_scheduler_program_runs_as_written(tmp_path):
    (tmp_path / "own_schedule.py").write_text(readme_schedule_program())
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def run(*args: str):
        return forkserver.run([sys.executable, "own_schedule.py", "--output-dir", "r", "--no-progress", *args],
                              capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)

    first = run("--epochs", "2", "--save-every-iters", "10")
    assert first.returncode == 0, first.stderr
    rows = json.loads((tmp_path / "r" / "history.json").read_text())
    assert len(rows) == 2 and rows[0]["lr"] != rows[1]["lr"] and rows[-1]["val_accuracy"] > 0.8
    saved = torch.load(next((tmp_path / "r" / "checkpoints").glob("last_*.pt")), weights_only=True)
    assert saved["lr_scheduler"]["last_epoch"] == 48  # 2 epochs of 24 steps (1,536 samples in batches of 64)


@pytest.mark.slow
def test_a_segmentation_run_shows_its_per_pixel_confusion_and_mean_iou(tmp_path):
    from engine import RunSettings
    from handlers import fit, seed_everything

    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 3, 8, 8, generator=g)
    y = x.argmax(1)  # each pixel's class: its largest channel, which a 1x1 convolution learns
    seed_everything(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 3, 1))
    settings = RunSettings(output_dir=str(tmp_path / "r"), epochs=2, batch_size=16, lr=1e-2, progress=False,
                           log_every=0, tb_images_every=1)
    result = fit(model, (x[:64], y[:64]), (x[64:], y[64:]), settings)
    assert result.exit_code == 0
    assert all(0 < row["val_miou"] <= 1 for row in result.history)
    assert result.history[-1]["val_miou"] > result.history[0]["val_miou"] - 0.05
    acc = EventAccumulator(str(tmp_path / "r" / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("val/confusion_matrix")] == [4, 8]  # each epoch's last iteration


def test_an_ignite_param_scheduler_runs_where_ignite_runs_it_and_a_plateau_steps_on_the_monitor(tmp_path):
    from ignite.handlers import PiecewiseLinear

    from engine import ConfigError, RunSettings
    from handlers import fit, seed_everything
    from tests.test_run import Regressor, regression_data

    base = dict(epochs=2, batch_size=32, progress=False, log_every=0, monitor="val_loss", mode="min", seed=1)
    seed_everything(1)
    model = Regressor()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ramp = PiecewiseLinear(optimizer, "lr", [(0, 0.01), (40, 0.05)])  # 20 iterations an epoch
    result = fit(model, regression_data(640, 1), regression_data(200, 2),
                 RunSettings(output_dir=str(tmp_path / "a"), **base), classification=False, optimizer=optimizer,
                 lr_scheduler=ramp)
    assert [round(r["lr"], 6) for r in result.history] == [round(0.01 + 0.04 * 19 / 40, 6), 0.049]
    seed_everything(1)
    model = Regressor()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", patience=0, factor=0.5,
                                                         threshold=10.0)  # never an improvement: halve each time
    result = fit(model, regression_data(640, 1), regression_data(200, 2),
                 RunSettings(output_dir=str(tmp_path / "b"), **{**base, "epochs": 3}), classification=False,
                 optimizer=optimizer, lr_scheduler=plateau, lr_scheduler_interval="epoch")
    assert [r["lr"] for r in result.history] == [0.1, 0.05, 0.025]  # each epoch's steps, before its validation
    with pytest.raises(ConfigError, match="both --scheduler onecycle|both scheduler='onecycle'"):
        fit(Regressor(), regression_data(64, 1), regression_data(32, 2),
            RunSettings(output_dir=str(tmp_path / "c"), scheduler="onecycle", **base), classification=False,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1))
