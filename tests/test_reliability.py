"""Reliability: stop signals, exact mid-epoch resume, a full disk, hostile files, one run per folder,
bad input. Real subprocesses on real MNIST, real signals sent when the run prints a given line."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import CheckpointError
from handlers import load_checkpoint
from tests import forkserver
from tests.conftest import SCRIPT, run_main, run_script
from tests.test_integrity import flip_tensor_bit
from tests.test_train_mnist import QUICK, figures, final_weights, history, kill_when

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "preset, data_path, workers, sig, expected",
    [("seed", "memory", 0, signal.SIGTERM, 143),  # the seed's dropout: the global RNG must be restored too
     ("fast", "torchvision", 0, signal.SIGINT, 130),
     ("fast", "torchvision", 2, signal.SIGTERM, 143)],
)
def test_stop_signal_saves_mid_epoch_and_resume_is_bit_exact(mnist_root, tmp_path, preset, data_path, workers, sig,
                                                             expected):
    args = [*QUICK, "--epochs", "2", "--data-path", data_path, "--num-workers", str(workers), "--seed", "5",
            "--preset", preset, "--val-every", "2",  # one validation per run: the test is about training
            "--deterministic"]  # (a no-op on a CPU; on a GPU what makes the resume bit-exact)
    straight = tmp_path / "straight"  # the reference in-process; the stopped run and its resume: processes
    assert run_main(*args, "--output-dir", str(straight), mnist=mnist_root).returncode == 0
    stopped = tmp_path / "stopped"
    code, output = kill_when([*args, "--output-dir", str(stopped)], mnist_root, "Epoch 2, Batch 10", sig)
    assert code == expected, output
    assert f"Received {signal.Signals(sig).name}" in output and "continue with --resume auto" in output
    saved = sorted((stopped / "checkpoints").glob("last_iter=*.pt"), key=lambda p: int(p.stem.split("=")[1]))
    step = int(saved[-1].stem.split("=")[1])
    assert 40 <= step < 60  # mid-epoch 2 (30 batches per epoch)
    resumed = run_script(*args, "--output-dir", str(stopped), "--resume", "auto", mnist=mnist_root)
    assert resumed.returncode == 0, resumed.stderr
    assert f"iteration {step})" in resumed.stdout
    assert figures(history(stopped)) == figures(history(straight))
    a, b = final_weights(straight), final_weights(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)


EVERY_7 = [*QUICK, "--epochs", "2", "--save-every-iters", "7", "--seed", "1", "--deterministic"]  # bit-exact on a GPU


@pytest.fixture(scope="module")
def killed_every_7(mnist_root, tmp_path_factory):
    """An uninterrupted run saving every 7 iterations, and the same run SIGKILLed mid-epoch 2 (both
    resume tests start from a copy of the killed folder)."""
    straight, killed = tmp_path_factory.mktemp("straight") / "run", tmp_path_factory.mktemp("killed") / "run"
    assert run_main(*EVERY_7, "--output-dir", str(straight), mnist=mnist_root).returncode == 0  # in-process
    code, output = kill_when([*EVERY_7, "--output-dir", str(killed)], mnist_root, "Epoch 2, Batch 20")
    assert code == -signal.SIGKILL, output
    return straight, killed


@pytest.mark.parametrize("damage_newest", [False, True])
def test_save_every_iters_then_sigkill_resumes_mid_epoch_exactly(mnist_root, tmp_path, killed_every_7, damage_newest):
    args, killed = EVERY_7, tmp_path / "killed"
    straight, template = killed_every_7
    shutil.copytree(template, killed)
    names = sorted(p.name for p in (killed / "checkpoints").glob("last_*.pt"))
    assert len(names) == 2 and "last_iter=49.pt" in names  # rotation keeps the two newest
    if damage_newest:  # one flipped bit inside a tensor, same length: torch.load would not notice
        flip_tensor_bit(killed / "checkpoints" / "last_iter=49.pt")
    resumed = run_script(*args, "--output-dir", str(killed), "--resume", "auto", mnist=mnist_root)
    at = 42 if damage_newest else 49
    assert resumed.returncode == 0 and f"iteration {at})" in resumed.stdout, resumed.stdout + resumed.stderr
    if damage_newest:
        assert "Skipping last_iter=49.pt: " in resumed.stdout and "is damaged" in resumed.stdout
    assert figures(history(killed)) == figures(history(straight))
    a, b = final_weights(straight), final_weights(killed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_second_ctrl_c_exits_at_once_and_leaves_saved_files_valid(mnist_root, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = forkserver.popen([sys.executable, str(SCRIPT), *QUICK, "--epochs", "3", "--output-dir", str(out),
                             "--data-dir", str(mnist_root), "--preset", "seed"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        if "Epoch 2, Batch 10" in line:
            proc.send_signal(signal.SIGINT)
        if "Received SIGINT" in line:
            proc.send_signal(signal.SIGINT)
            break
    proc.stdout.read()
    assert proc.wait(timeout=60) == 130
    for path in (out / "checkpoints").glob("*.pt"):
        assert load_checkpoint(path)["trainer"]["iteration"] >= 30


@pytest.fixture
def tiny_disk(tmp_path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real full disk needs root to mount a small tmpfs")
    size_kb = 1700  # the first epoch's best + last (760 KB each) fit; a third file does not
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mount_point)]).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=False)


def test_disk_full_ends_with_a_clear_line_and_the_previous_checkpoint_loads(mnist_root, tiny_disk):
    out = tiny_disk / "run"
    proc = run_script(*QUICK, "--epochs", "4", "--no-tensorboard", "--patience", "0", "--output-dir", str(out),
                      mnist=mnist_root)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "No space left on device" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "is intact" in proc.stderr
    files = list((out / "checkpoints").iterdir())
    assert not [f for f in files if f.name.startswith(".tmp")]
    lasts = [f for f in files if f.name.startswith("last_")]
    assert lasts and all(load_checkpoint(f)["model"] for f in lasts)


def test_checkpoint_of_another_model_names_the_tensor(mnist_root, tmp_path):
    first = tmp_path / "narrow"
    assert run_main(*QUICK, "--epochs", "1", "--width", "8", "--output-dir", str(first),
                    mnist=mnist_root).returncode == 0  # in-process; the refused resume: a process
    ckpt = next((first / "checkpoints").glob("last_*.pt"))
    proc = run_script(*QUICK, "--resume", str(ckpt), "--output-dir", str(tmp_path / "wide"), mnist=mnist_root)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "net.0.weight" in proc.stderr and "(8, 1, 5, 5)" in proc.stderr and "(16, 1, 5, 5)" in proc.stderr


@pytest.mark.parametrize("kind, run", [("code", run_script), ("not-ours", run_main), ("text", run_main)],
                         ids=["code", "not-ours", "text"])  # the pickle that runs a command: in a real process
def test_hostile_or_foreign_resume_file_is_refused(mnist_root, tmp_path, kind, run):
    bad = tmp_path / "bad.pt"
    marker = tmp_path / "pwned"
    if kind == "code":
        payload = (f"cos\nsystem\n(S'touch {marker}'\ntR.").encode()  # a pickle that runs a shell command
        bad.write_bytes(payload)
    elif kind == "not-ours":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, bad)
    else:
        bad.write_text("hello")
    proc = run("--resume", str(bad), "--output-dir", str(tmp_path / "r"), mnist=mnist_root)
    assert proc.returncode == 2 and str(bad) in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert not marker.exists()


def test_second_run_on_a_busy_output_dir_is_refused_and_a_killed_run_leaves_no_stuck_lock(mnist_root, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = forkserver.popen([sys.executable, str(SCRIPT), *QUICK, "--epochs", "3", "--preset", "seed",
                              "--output-dir", str(out), "--data-dir", str(mnist_root)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in first.stdout:
            if "Epoch 1, Batch 10" in line:
                break
        second = run_main(*QUICK, "--output-dir", str(out), "--resume", "auto", "--preset", "seed",
                          mnist=mnist_root)  # in-process: the lock is held by the other process
        assert second.returncode == 2 and "in use by another run" in second.stderr, second.stderr
    finally:
        first.kill()
        first.wait()
    third = run_main(*QUICK, "--epochs", "1", "--output-dir", str(out), "--resume", "auto", "--preset", "seed",
                     mnist=mnist_root)
    assert third.returncode == 0, third.stderr


def write_idx(path: Path, tensor: torch.Tensor) -> None:
    codes = {torch.uint8: 0x08, torch.float32: 0x0D, torch.int32: 0x0C}
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, codes[tensor.dtype], tensor.dim()))
        f.write(struct.pack(f">{tensor.dim()}I", *tensor.shape))
        f.write(tensor.numpy().astype(tensor.numpy().dtype.newbyteorder(">")).tobytes())


def fake_mnist(root: Path, images: torch.Tensor, labels: torch.Tensor, partial: bool = False) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        if not partial:
            write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.mark.parametrize(
    "images, labels, partial, needle, run",
    [  # the first a real process, the others in-process through the same cli.main
        (torch.zeros(0, 28, 28, dtype=torch.uint8), torch.zeros(0, dtype=torch.uint8), False, "empty", run_script),
        (torch.zeros(20, 32, 32, dtype=torch.uint8), torch.zeros(20, dtype=torch.uint8), False, "28x28", run_main),
        (torch.zeros(20, 28, 28, dtype=torch.uint8), torch.zeros(20, dtype=torch.float32), False, "float32 values",
         run_main),
        (torch.zeros(20, 28, 28, dtype=torch.uint8), torch.full((20,), 12, dtype=torch.uint8), False, "[0, 9]",
         run_main),
        (torch.zeros(20, 28, 28, dtype=torch.uint8), torch.zeros(20, dtype=torch.uint8), True, "MNIST not found",
         run_main),
    ],
    ids=["empty", "shape", "float-labels", "label-range", "partial-dir"],
)
def test_bad_data_is_one_line_before_any_training(tmp_path, images, labels, partial, needle, run):
    root = fake_mnist(tmp_path / "data", images, labels, partial)
    out = tmp_path / "run"
    proc = run("--data-dir", str(root), "--no-download", "--output-dir", str(out), mnist=None)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (out / "checkpoints").exists()


@pytest.fixture(scope="module")
def real_checkpoint_bytes(tmp_path_factory) -> bytes:
    from ignite.engine import Engine, Events
    from torch import nn

    from handlers import TrainingCheckpoint

    folder = tmp_path_factory.mktemp("ckpt")
    trainer = Engine(lambda e, b: None)
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: e.state.metrics.__setitem__("val_accuracy", 0.5))
    TrainingCheckpoint(folder, {"model": nn.Linear(4, 3), "trainer": trainer}).attach(trainer)
    trainer.run([0], max_epochs=1)
    return (folder / "last_iter=1.pt").read_bytes()


@settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_and_mutated_bytes_always_give_a_clear_error(tmp_path_factory, real_checkpoint_bytes, data):
    raw = bytearray(real_checkpoint_bytes)
    how = data.draw(st.sampled_from(["random", "flip", "truncate", "splice"]))
    if how == "random":
        blob = data.draw(st.binary(min_size=0, max_size=2048))
    elif how == "truncate":
        blob = bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
    elif how == "flip":
        for _ in range(data.draw(st.integers(1, 20))):
            i = data.draw(st.integers(0, len(raw) - 1))
            raw[i] = data.draw(st.integers(0, 255))
        blob = bytes(raw)
    else:
        i = data.draw(st.integers(0, len(raw)))
        blob = bytes(raw[:i]) + data.draw(st.binary(max_size=256)) + bytes(raw[i:])
    path = tmp_path_factory.mktemp("fuzz") / "last_iter=1.pt"
    path.write_bytes(blob)
    try:
        loaded = load_checkpoint(path)
    except CheckpointError as exc:
        assert str(path) in str(exc)
    else:  # a mutation that left the file valid must still be a whole checkpoint
        assert "model" in loaded and "trainer" in loaded
