"""A user's own data through `fit` and `cli.main` (tests/user_program.py: real subprocesses, real
SIGKILL; the uninterrupted references in-process): augmentation drawn afresh and resumed exactly with 0
and 2 workers, batch transforms on the fast path, streams with and without a position, dict batches
and dict outputs, a data set far larger than memory."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import forkserver, user_program
from tests.conftest import in_process
from tests.test_train_mnist import figures

PROGRAM = Path(__file__).resolve().parent / "user_program.py"
pytestmark = pytest.mark.slow


def program(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return forkserver.run([sys.executable, str(PROGRAM), *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def in_this_process(*args: str) -> subprocess.CompletedProcess:
    """The same program through its ``main(argv)`` in this process (a reference run, a second refusal)."""
    return in_process(user_program.main, list(args))


def newest_state(run: Path) -> dict:
    newest = max((run / "checkpoints").glob("last_iter=*.pt"), key=lambda p: int(p.stem.split("=")[1]))
    return torch.load(newest, weights_only=True)


def assert_same_tensors(a, b, where: str = "") -> None:
    """Equal bit for bit, key by key, all the way down (model and optimizer states)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def history(run: Path) -> list[dict]:
    return figures(json.loads((run / "history.json").read_text()))


# 8 batches an epoch (256 samples; the streams: 200 samples, 7 batches); killed in epoch 2, one iteration
# after a checkpoint (a handler of the user's runs before ours at the same event)
# the stateful stream read by 2 workers (each keeps its own position in its share: torchdata saves both)
# and the stream killed in its first pass, while the length of its epochs is not yet known
KILLED = [("augment", 0, 13), ("augment", 2, 13), ("fast", 0, 13), ("stream", 2, 11), ("stream", 2, 5),
          ("stream-stateless", 0, 11)]


@pytest.mark.parametrize("kind, workers, kill_at", KILLED)
def test_sigkill_mid_epoch_2_then_resume_equals_an_uninterrupted_run(tmp_path, kind, workers, kill_at):
    # --deterministic: on a CPU nothing changes; on a GPU it is what makes a resume bit-exact (README)
    args = ["--kind", kind, "--num-workers", str(workers), "--save-every-iters", "2", "--seed", "4", "--deterministic"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = in_this_process(*args, "--output-dir", str(straight), "--record", str(tmp_path / "straight.txt"))
    assert done.returncode == 0, done.stderr
    first = program(*args, "--output-dir", str(killed), "--kill-at", str(kill_at), "--record", str(tmp_path / "k.txt"))
    assert first.returncode == -signal.SIGKILL, first.stderr
    resumed = program(*args, "--output-dir", str(killed), "--resume", "auto", "--record", str(tmp_path / "k.txt"))
    assert resumed.returncode == 0, resumed.stderr
    saved_at = kill_at - 1
    assert f"iteration {saved_at})" in resumed.stdout
    if kind == "stream-stateless":
        assert "a resume mid-epoch reads again the batches that epoch had consumed" in resumed.stdout
        assert ("The stream has no state_dict: reading again the 3 batch(es) of this pass it had consumed"
                in resumed.stdout)
    assert history(killed) == history(straight)
    a, b = newest_state(straight), newest_state(killed)
    assert_same_tensors(a["model"], b["model"], "model")
    assert_same_tensors(a["optimizer"], b["optimizer"], "optimizer")
    # the batches after the checkpoint were the same batches again
    records = (tmp_path / "k.txt").read_text().splitlines()
    replayed = [line for line in records if int(line.split()[0]) > saved_at]
    straight_records = (tmp_path / "straight.txt").read_text().splitlines()
    assert sorted(set(replayed)) == sorted(line for line in straight_records if int(line.split()[0]) > saved_at)


@pytest.mark.parametrize("kind", ["augment", "stream"])  # the loader path and a stream, each read by 2 workers
def test_a_run_killed_with_two_workers_leaves_its_folder_free_at_once(tmp_path, kind):
    args = ["--kind", kind, "--num-workers", "2", "--save-every-iters", "2", "--epochs", "2"]
    out = tmp_path / "r"
    assert program(*args, "--output-dir", str(out), "--kill-at", "5").returncode == -signal.SIGKILL
    fd = os.open(out / ".lock", os.O_RDWR)  # at once: the killed run's workers are still alive (5 s to notice)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if one of them still held the lock
    finally:
        os.close(fd)
    resumed = program(*args, "--output-dir", str(out), "--resume", "auto")
    assert resumed.returncode == 0 and "is in use" not in resumed.stderr, resumed.stderr
    assert "iteration 4)" in resumed.stdout


@pytest.mark.parametrize("kind", ["dict", "text"])  # a dict of one image; a dict of two inputs for forward(a, b)
def test_dict_and_two_input_batches_with_every_default_handler_resume_bit_exact_after_sigkill(tmp_path, kind):
    args = ["--kind", kind, "--save-every-iters", "2", "--seed", "4", "--deterministic", "--all-handlers"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert in_this_process(*args, "--output-dir", str(straight)).returncode == 0
    assert program(*args, "--output-dir", str(killed), "--kill-at", "13").returncode == -signal.SIGKILL
    resumed = program(*args, "--output-dir", str(killed), "--resume", "auto")
    assert resumed.returncode == 0 and "iteration 12)" in resumed.stdout, resumed.stderr
    assert "Epoch 2, Batch 6, Train Loss: " in resumed.stdout and (killed / "tb").is_dir()  # lines, TensorBoard
    assert history(killed) == history(straight)
    a, b = newest_state(straight), newest_state(killed)
    assert_same_tensors(a["model"], b["model"], "model")
    assert_same_tensors(a["optimizer"], b["optimizer"], "optimizer")


def test_a_two_input_forward_without_model_fn_is_one_line_naming_it(tmp_path):
    bad = program("--kind", "text", "--no-model-fn", "--output-dir", str(tmp_path / "bad"))
    assert bad.returncode == 2 and not (tmp_path / "bad").exists()
    assert bad.stderr.strip().splitlines() == [
        "error: the training set's batches are dicts, so the model is called with their keys besides the target "
        "(input_ids, attention_mask) as one dict, but its forward takes separate arguments (TextClassifier.forward() "
        "missing 1 required positional argument: 'attention_mask'): pass model_fn=lambda model, x: model(**x) (each "
        "key as the argument of its name), or prepare_batch=fn(batch, device, non_blocking) -> (x, y)"]


@pytest.mark.parametrize("kind", ["augment", "fast"])
def test_the_same_run_with_0_and_2_workers_trains_on_identical_batches(tmp_path, kind):
    logs = []
    for workers, run in ((0, in_this_process), (2, program)):
        log = tmp_path / f"w{workers}.txt"
        done = run("--kind", kind, "--num-workers", str(workers), "--epochs", "2", "--output-dir",
                   str(tmp_path / f"w{workers}"), "--record", str(log), "--deterministic")  # (bit-exact on a GPU too)
        assert done.returncode == 0, done.stderr
        logs.append(log.read_text())
    assert logs[0] == logs[1] and len(logs[0].splitlines()) == 16
    assert history(tmp_path / "w0") == history(tmp_path / "w2")


def test_a_dict_batch_and_a_dict_output_train_to_the_end_and_without_model_transform_one_line(tmp_path):
    done = in_this_process("--kind", "dict", "--epochs", "2", "--output-dir", str(tmp_path / "ok"))
    assert done.returncode == 0, done.stderr
    assert [row["epoch"] for row in history(tmp_path / "ok")] == [1, 2]
    bad = program("--kind", "dict", "--no-model-transform", "--output-dir", str(tmp_path / "bad"))
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        'error: the model returned a dict with keys logits, features, not a tensor: pass '
        'model_transform=lambda out: out["logits"] (the tensor the loss and metrics take)']


def test_a_lazy_set_of_two_million_samples_reaches_its_first_batch_and_refuses_memory_in_one_line(tmp_path):
    done = program("--kind", "lazy", "--epochs", "1", "--limit-train-batches", "5", "--output-dir",
                   str(tmp_path / "lazy"))
    assert done.returncode == 0, done.stderr
    seconds, rss = map(float, re.search(r"first batch after ([\d.]+) s, peak RSS ([\d.]+) GB", done.stdout).groups())
    assert seconds < 10 and rss < 2, done.stdout
    refused = in_this_process("--kind", "lazy", "--data-path", "memory", "--output-dir", str(tmp_path / "mem"))
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(r"error: the training set would take about [\d.]+ GB in memory \(2000000 "
                                        r"samples like the first\), more than this machine's RAM has free", lines[0])
    assert "use --data-path loader" in lines[0]
