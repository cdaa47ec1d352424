"""A run survives what happens around it, with real processes: a resume whose settings would move the saved
data position is refused in one line with the folder untouched (other changes are taken and said); a data
loader that stalls ends the run with one line and its exit code, no process left behind, while a slow one
finishes; SIGHUP (a closed terminal) stops a run as SIGTERM does, and the resume is bit for bit the
uninterrupted run, TensorBoard's points included."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests import forkserver
from tests.conftest import in_process, run_main
from tests.test_examples import readme_program
from tests.test_train_mnist import QUICK, figures, final_weights, history, kill_when

pytestmark = pytest.mark.slow
QUIET = ["--no-progress", "--log-every", "0"]
STALL_PROGRAM = '''
import sys, threading, time
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import Dataset

from engine import RunSettings
from handlers import cli, fit


class Blocking(Dataset):  # blocks for ever on one sample, or sleeps a while on each
    def __init__(self, n, block_at, sleep):
        g = torch.Generator().manual_seed(n)
        self.x, self.y = torch.randn(n, 8, generator=g), torch.randint(0, 2, (n,), generator=g)
        self.block_at, self.sleep = block_at, sleep

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if i == self.block_at:
            threading.Event().wait()
        time.sleep(self.sleep)
        return self.x[i], self.y[i]


@dataclass
class Settings(RunSettings):
    batch_size: int = 16
    epochs: int = 1
    block_at: int | None = None
    sleep: float = 0.0


def train(s):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    return fit(model, Blocking(256, s.block_at, s.sleep), Blocking(64, None, 0.0), s, name="stall")


if __name__ == "__main__":
    parser = cli.run_parser("A blocking data set.", Settings())
    parser.add_argument("--block-at", type=int)
    parser.add_argument("--sleep", type=float)
    sys.exit(cli.main(train, parser, Settings))
'''


def python(*args: str, cwd: Path, timeout: float = 300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return forkserver.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file of a run folder and a hash of its bytes (the lock file aside: it holds the pid of its holder)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def my_train(tmp_path_factory):
    """The README's program, trained 2 epochs (batch 32 over 4,096 samples), as the folder every case resumes."""
    home = tmp_path_factory.mktemp("my_train")
    (home / "my_train.py").write_text(readme_program())
    proc = python("my_train.py", "--output-dir", "runs/a", "--epochs", "2", *QUIET, cwd=home)
    assert proc.returncode == 0, proc.stderr
    spec = importlib.util.spec_from_file_location("readme_my_train", home / "my_train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return home, module


def main_of(module):
    def main(argv: list[str]) -> int:
        parser = module.cli.run_parser("Train TinyNet.", module.Settings())
        parser.add_argument("--hidden", type=int, help="hidden units")
        return module.cli.main(module.train, parser, module.Settings, argv=argv)
    return main


REFUSED = [("--batch-size", "64", "error: --batch-size was 32 when this run was saved and is 64 now"),
           ("--seed", "3", "error: --seed was 0 when this run was saved and is 3 now"),
           ("--data-path", "loader", "error: the training data was read into memory when this run was saved and is "
                                     "read through a DataLoader now (--data-path)"),
           ("--limit-train-batches", "20", "error: --limit-train-batches was none when this run was saved and is 20"),
           ("--accumulation-steps", "2", "error: --accumulation-steps was 1 when this run was saved and is 2 now")]


@pytest.mark.parametrize("flag, new, said", REFUSED, ids=[case[0] for case in REFUSED])
def test_a_resume_that_would_move_the_data_position_is_one_line_and_leaves_the_folder_untouched(my_train, flag, new,
                                                                                                said):
    home, module = my_train
    before = snapshot(home / "runs" / "a")
    argv = ["--output-dir", str(home / "runs" / "a"), "--resume", "auto", "--epochs", "4", flag, new, *QUIET]
    if flag == "--batch-size":  # the first case as a real process; the others in this one (the same main)
        proc = python("my_train.py", *argv, cwd=home)
    else:
        proc = in_process(main_of(module), argv)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(said), proc.stderr
    assert "--output-dir" in proc.stderr and "Epoch 3" not in proc.stdout
    assert snapshot(home / "runs" / "a") == before


def test_a_training_set_of_another_length_is_refused(my_train, tmp_path):
    home, module = my_train
    short = tmp_path / "short.py"  # the same program, 2,048 training samples instead of 4,096 (in this process)
    short.write_text(readme_program().replace("make_data(4096, 1)", "make_data(2048, 1)"))
    spec = importlib.util.spec_from_file_location("readme_my_train_short", short)
    shorter = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = shorter
    spec.loader.exec_module(shorter)
    before = snapshot(home / "runs" / "a")
    proc = in_process(main_of(shorter), ["--output-dir", str(home / "runs" / "a"), "--resume", "auto", "--epochs", "4",
                                         *QUIET])
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "the training data holds 64 batches an epoch now and held 128 when this run was saved" in proc.stderr
    assert snapshot(home / "runs" / "a") == before


def test_a_changed_epoch_count_trains_to_it_exactly_and_a_changed_worker_count_is_exact(my_train, tmp_path):
    home, module = my_train
    main = main_of(module)
    straight = tmp_path / "straight"  # 4 epochs in one go
    assert in_process(main, ["--output-dir", str(straight), "--epochs", "4", *QUIET]).returncode == 0
    resumed = tmp_path / "resumed"
    assert in_process(main, ["--output-dir", str(resumed), "--epochs", "1", *QUIET]).returncode == 0
    more = in_process(main, ["--output-dir", str(resumed), "--resume", "auto", "--epochs", "4", "--num-workers", "2",
                             "--data-path", "auto", *QUIET])
    assert more.returncode == 0, more.stderr
    assert "Resuming with settings changed since the checkpoint: --epochs 1 -> 4, --num-workers 0 -> 2" in more.stdout
    assert [r["epoch"] for r in history(resumed)] == [1, 2, 3, 4]
    assert figures(history(resumed)) == figures(history(straight))
    a, b = final_weights(straight), final_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((resumed / "config.json").read_text())
    assert config["epochs"] == 4 and config["num_workers"] == 2


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_that_blocks_ends_the_run_with_one_line_and_exit_code_5(tmp_path, workers):
    (tmp_path / "stall.py").write_text(STALL_PROGRAM)
    start = time.monotonic()
    proc = python("stall.py", "--output-dir", "r", "--block-at", "150", "--stall-timeout", "2", "--num-workers",
                  str(workers), "--save-every-iters", "1", *QUIET, cwd=tmp_path, timeout=120)
    took = time.monotonic() - start
    assert proc.returncode == 5, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith("error: stalled at epoch 1, iteration "), proc.stderr
    line = lines[0]
    assert "no batch came from the training loader" in line and "(--stall-timeout 2)" in line
    iteration = int(re.search(r"iteration (\d+)", line).group(1))
    saved = sorted((tmp_path / "r" / "checkpoints").glob("last_iter=*.pt"))
    if iteration > 1:  # the checkpoints before the stall are kept, the newest named
        assert f"the newest checkpoint {Path('r') / 'checkpoints' / f'last_iter={iteration - 1}.pt'} is kept" in line
        assert saved
    if workers:
        pid = int(re.search(r"its worker \d, pid (\d+), never delivered the batch", line).group(1))
        assert not _alive(pid)  # the workers ended with the run
    else:
        assert "__getitem__(150) at" in line and "stall.py:" in line  # the very sample it was fetching
    assert took < 2 + 15  # the limit plus the start-up and the end


def test_a_slow_loader_that_keeps_delivering_is_never_stopped(tmp_path):
    (tmp_path / "stall.py").write_text(STALL_PROGRAM)  # 16 samples of 0.05 s: a batch every 0.8 s, the limit 1.2 s
    proc = python("stall.py", "--output-dir", "r", "--sleep", "0.05", "--stall-timeout", "1.2",
                  "--limit-train-batches", "3", *QUIET, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [r["epoch"] for r in json.loads((tmp_path / "r" / "history.json").read_text())] == [1]


def _points(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]
            if not tag.startswith(("time/", "hparam/"))}


def test_sighup_saves_mid_epoch_and_the_resume_is_the_uninterrupted_run(mnist_root, tmp_path):
    args = [*QUICK, "--epochs", "2", "--seed", "5", "--preset", "fast", "--deterministic"]
    straight = tmp_path / "straight"
    assert run_main(*args, "--output-dir", str(straight), mnist=mnist_root).returncode == 0
    stopped = tmp_path / "stopped"
    code, output = kill_when([*args, "--output-dir", str(stopped)], mnist_root, "Epoch 2, Batch 10", signal.SIGHUP)
    assert code == 128 + signal.SIGHUP, output
    assert "Received SIGHUP: stopping after this iteration and saving a checkpoint" in output
    assert "continue with --resume auto" in output
    resumed = run_main(*args, "--output-dir", str(stopped), "--resume", "auto", mnist=mnist_root)
    assert resumed.returncode == 0, resumed.stderr
    assert figures(history(stopped)) == figures(history(straight))
    a, b = final_weights(straight), final_weights(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)
    points, reference = _points(stopped), _points(straight)
    assert set(points) == set(reference) and "loss/train_step" in points
    for tag, series in reference.items():  # every step once, no gap, no duplicate, the same values
        assert points[tag] == series, tag
