"""The example script for real: real MNIST, real subprocesses, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import forkserver
from tests.conftest import SCRIPT, run_main, run_script

pytestmark = pytest.mark.slow
TIMING_KEYS = {"epoch_seconds", "samples_per_second"}
QUICK = ["--limit-train-batches", "30", "--batch-size", "32", "--limit-val-batches", "1", "--log-every", "10",
         "--no-progress"]  # short runs of small batches where the figures are not the point


def history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "history.json").read_text())


def figures(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]


def final_weights(run_dir: Path) -> dict:
    newest = max((run_dir / "checkpoints").glob("last_iter=*.pt"), key=lambda p: int(p.stem.split("=")[1]))
    return torch.load(newest, weights_only=True)["model"]


def kill_when(args: list[str], mnist: Path, marker: str, sig: int = signal.SIGKILL) -> tuple[int, str]:
    """Start the script, send ``sig`` once it prints a line containing ``marker``; (returncode, output)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = forkserver.popen([sys.executable, str(SCRIPT), *args, "--data-dir", str(mnist)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            proc.send_signal(sig)
            break
    seen.append(proc.stdout.read())
    return proc.wait(timeout=120), "".join(seen)


def test_seed_preset_150_batches_reach_96_percent(mnist_root, tmp_path):
    # 150 of the seed's 938 batches of 64 in its first epoch, then the whole test set: the seed's network
    # is the costliest thing the suite trains (~0.17 s a batch on one AVX2 core). The validation in batches
    # of 100, not the preset's 1000: the same predictions, ~6 s sooner here (a batch of 1000 makes 147 MB
    # feature maps, past the CPU's caches). Seen (AVX2, fp32 as the preset asks): 96.57% after 150
    # batches, 96.75% after 200, 97.58% after 300
    out = tmp_path / "run"
    proc = run_script("--preset", "seed", "--epochs", "1", "--limit-train-batches", "150", "--val-batch-size", "100",
                      "--output-dir", str(out), "--no-progress", mnist=mnist_root)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    batch_lines = [line for line in lines if line.startswith("Epoch 1, Batch ")]
    assert [line.split(",")[1] for line in batch_lines[:3]] == [" Batch 50", " Batch 100", " Batch 150"]
    assert len(batch_lines) == 150 // 50  # every 50 batches, inside the batch loop (the seed's bug)
    assert any(line.startswith("Epoch 1, Train Loss: ") and "Train Accuracy: " in line for line in lines)
    val = [line for line in lines if line.startswith("Epoch 1, Val Loss: ")]
    assert len(val) == 1
    rows = history(out)
    assert len(rows) == 1
    row = rows[0]
    assert {"epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_samples", "lr",
            "epoch_seconds"} <= set(row)
    # 96% after 150 batches is one draw of the seed's dropout masks and one machine's arithmetic: on a GPU the masks
    # come from CUDA's generator and the convolutions run in TF32 (H200: 95.83%), so the bar there is half a point lower
    floor = 0.955 if json.loads((out / "config.json").read_text())["device"].startswith("cuda") else 0.96
    assert row["val_accuracy"] >= floor and row["val_samples"] == 10000 and row["lr"] == 1e-3
    assert f"Val Accuracy: {row['val_accuracy'] * 100:.2f}%" in val[0]
    config = json.loads((out / "config.json").read_text())
    assert (config["batch_size"], config["epochs"], config["model"], config["lr"]) == (64, 1, "seed", 1e-3)


def test_default_preset_reaches_99_percent(mnist_root, tmp_path):
    out = tmp_path / "run"
    proc = run_script("--output-dir", str(out), "--no-progress", mnist=mnist_root)
    assert proc.returncode == 0, proc.stderr
    best = max(row["val_accuracy"] for row in history(out))
    assert best >= 0.99, best


def test_missing_data_offline_is_one_line_and_exit_2(tmp_path):
    proc = run_script("--data-dir", str(tmp_path / "nowhere"), "--no-download", "--output-dir", str(tmp_path / "r"),
                      mnist=None)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert str(tmp_path / "nowhere") in proc.stderr and "MNIST_ROOT" in proc.stderr


def test_invalid_flag_is_one_line_and_exit_2(tmp_path, mnist_root):
    proc = run_script("--epochs", "0", "--output-dir", str(tmp_path / "r"), mnist=mnist_root)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr == "error: argument --epochs: must be a positive integer, got 0 (see --help)\n"


def test_misspelled_monitor_stops_at_the_first_validation_with_one_line(mnist_root, tmp_path):
    proc = run_main("--monitor", "val_acc", "--limit-train-batches", "5", "--output-dir", str(tmp_path / "r"),
                    "--no-progress", mnist=mnist_root)  # in-process: the one-line refusals are processes elsewhere
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.startswith("error: --monitor 'val_acc' is not a metric of this run; it has: ")
    assert "val_accuracy" in proc.stderr and "Epoch 1, Batch 5" not in proc.stdout  # --log-every 50: none yet


@pytest.mark.parametrize("device, run", [("tpu", run_script), ("cuda:7", run_main)], ids=["tpu", "cuda:7"])
def test_unknown_or_absent_device_is_one_line(tmp_path, mnist_root, device, run):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    proc = run("--device", device, "--output-dir", str(tmp_path / "r"), mnist=mnist_root)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "device" in proc.stderr


def test_existing_run_dir_without_resume_is_refused(mnist_root, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "history.json").write_text("[]")
    proc = run_main("--output-dir", str(out), mnist=mnist_root)
    assert proc.returncode == 2 and "--resume auto" in proc.stderr
    assert (out / "history.json").read_text() == "[]"


@pytest.mark.parametrize("data_path", ["memory", "torchvision"])
def test_sigkill_during_an_epoch_then_resume_auto_equals_an_uninterrupted_run(mnist_root, tmp_path, data_path):
    args = [*QUICK, "--epochs", "2", "--data-path", data_path, "--seed", "3", "--deterministic"]  # bit-exact on a GPU
    straight = tmp_path / "straight"  # the reference in-process; the killed run and its resume: processes
    assert run_main(*args, "--output-dir", str(straight), mnist=mnist_root).returncode == 0
    killed = tmp_path / "killed"
    code, output = kill_when([*args, "--output-dir", str(killed)], mnist_root, "Epoch 2, Batch 20")
    assert code == -signal.SIGKILL, output
    assert len(history(killed)) == 1
    resumed = run_script(*args, "--output-dir", str(killed), "--resume", "auto", mnist=mnist_root)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resumed from" in resumed.stdout
    assert figures(history(killed)) == figures(history(straight))
    a, b = final_weights(straight), final_weights(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_extends_a_finished_run(mnist_root, tmp_path):
    out = tmp_path / "R"
    first = run_main("--epochs", "2", "--limit-train-batches", "50", "--output-dir", str(out), "--no-progress",
                     "--patience", "0", mnist=mnist_root)  # in-process; the run extending it: a process
    assert first.returncode == 0, first.stderr
    two = history(out)
    second = run_script("--epochs", "3", "--limit-train-batches", "50", "--output-dir", str(out), "--resume", "auto",
                        "--no-progress", "--patience", "0", mnist=mnist_root)
    assert second.returncode == 0, second.stderr
    three = history(out)
    assert [r["epoch"] for r in three] == [1, 2, 3] and three[:2] == two
    files = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert [f for f in files if f.startswith("last_")] == ["last_iter=100.pt", "last_iter=150.pt"]
    assert len([f for f in files if f.startswith("best_")]) == 2


def test_resume_from_a_damaged_path_is_one_clear_line(mnist_root, tmp_path):
    bad = tmp_path / "last_iter=1.pt"
    bad.write_bytes(b"\x00" * 100)
    proc = run_main("--resume", str(bad), "--output-dir", str(tmp_path / "r"), mnist=mnist_root)
    assert proc.returncode == 2 and str(bad) in proc.stderr and "Traceback" not in proc.stderr


def test_custom_handler_example_runs_beside_ours(mnist_root, tmp_path):
    script = SCRIPT.parent / "custom_handler.py"
    proc = forkserver.run([sys.executable, str(script), "--data-dir", str(mnist_root), "--epochs", "3",
                           "--limit-train-batches", "50", "--target", "0.8", "--no-progress", "--output-dir",
                           str(tmp_path / "custom")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    stop = next(i for i, line in enumerate(lines) if line.startswith("Reached "))
    # the decision (Stage.DECISION) ran before the plain handler of the same epoch, which saw val metrics;
    # 50 batches give 89-93% after epoch 1 by precision and threads (bf16, one thread: 89.19%): target 80%
    mine = [line for line in lines[stop:] if line.startswith("[my handler]")]
    assert mine[0].startswith("[my handler] epoch 1: train_loss=")
    assert lines[-1] == "[my handler] stopped early: True"
    saved = torch.load(next((tmp_path / "custom" / "checkpoints").glob("last_*.pt")), weights_only=True)
    assert saved["handler0_StopAtAccuracy"] == {"reached_at": 1}  # its state rides in the checkpoint
