"""TensorBoard event files read back by TensorBoard itself: its reader and its HTTP server."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import run_main, run_script
from tests.test_train_mnist import kill_when

pytestmark = pytest.mark.slow
EPOCH_TAGS = ["loss/train", "loss/val", "accuracy/train", "accuracy/val", "time/epoch_seconds",
              "time/samples_per_second"]
STEP_TAGS = ["loss/train_step", "lr", "grad_norm"]
ARGS = ["--epochs", "2", "--limit-train-batches", "100", "--batch-size", "32", "--limit-val-batches", "1",
        "--log-every", "20", "--no-progress"]  # what is written is the point, not the figures


def accumulate(path: Path) -> EventAccumulator:
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def run_dir(mnist_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tb") / "run"
    proc = run_main(*ARGS, "--output-dir", str(out), mnist=mnist_root)  # in-process: the files are the point
    assert proc.returncode == 0, proc.stderr
    return out


def test_every_scalar_tag_once_per_step(run_dir):
    acc = accumulate(run_dir / "tb")
    tags = acc.Tags()["scalars"]
    for tag in EPOCH_TAGS:  # an epoch's points at its last iteration: every step of a run is an iteration
        assert [e.step for e in acc.Scalars(tag)] == [100, 200], tag
    for tag in STEP_TAGS:
        assert [e.step for e in acc.Scalars(tag)] == list(range(20, 201, 20)), tag
    assert set(EPOCH_TAGS + STEP_TAGS) <= set(tags)
    history = json.loads((run_dir / "history.json").read_text())
    assert [e.value for e in acc.Scalars("accuracy/val")] == pytest.approx([r["val_accuracy"] for r in history])


def test_images_after_the_last_validation(run_dir):
    acc = accumulate(run_dir / "tb")
    for tag in ("val/confusion_matrix", "val/misclassified"):
        events = acc.Images(tag)
        assert [e.step for e in events] == [200] and events[-1].width > 100 and events[-1].height > 50


def test_images_every_epoch_on_request(mnist_root, tmp_path):
    out = tmp_path / "run"
    proc = run_main(*ARGS, "--tb-images-every", "1", "--limit-train-batches", "10", "--output-dir", str(out),
                    mnist=mnist_root)
    assert proc.returncode == 0, proc.stderr
    assert [e.step for e in accumulate(out / "tb").Images("val/confusion_matrix")] == [10, 20]


def test_hparams_hold_the_config_and_the_results(run_dir):
    acc = accumulate(run_dir / "tb" / "hparams")
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    sessions = [plugin_data_pb2.HParamsPluginData.FromString(v) for v in content.values()]
    start = next(s.session_start_info for s in sessions if s.HasField("session_start_info"))
    assert start.hparams["batch_size"].number_value == 32 and start.hparams["model"].string_value == "fast"
    best = acc.Scalars("hparam/best_val_accuracy")[0].value
    history = json.loads((run_dir / "history.json").read_text())
    assert best == pytest.approx(max(r["val_accuracy"] for r in history))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def test_tensorboard_server_serves_the_curves_of_history(run_dir):
    port = free_port()
    tb_bin = Path(sys.executable).parent / "tensorboard"
    server = subprocess.Popen([str(tb_bin), "--logdir", str(run_dir / "tb"), "--host", "127.0.0.1", "--port",
                               str(port), "--load_fast=false", "--reload_interval", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        tags = {}
        while time.monotonic() < deadline:
            assert server.poll() is None, server.stderr.read()
            try:
                tags = get_json(f"{base}/data/plugin/scalars/tags")
            except OSError:
                tags = {}
            if "accuracy/val" in tags.get(".", {}):
                break
            time.sleep(0.2)
        assert set(EPOCH_TAGS) <= set(tags["."]), tags
        query = urllib.parse.urlencode({"run": ".", "tag": "accuracy/val"})
        series = get_json(f"{base}/data/plugin/scalars/scalars?{query}")
        history = json.loads((run_dir / "history.json").read_text())
        assert [step for _, step, _ in series] == [100, 200]  # the epochs' last iterations
        assert [value for _, _, value in series] == pytest.approx([r["val_accuracy"] for r in history], abs=1e-6)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


def test_killed_and_resumed_run_has_no_step_twice(mnist_root, tmp_path):
    out = tmp_path / "run"
    args = ["--epochs", "3", "--limit-train-batches", "60", "--batch-size", "32", "--limit-val-batches", "1",
            "--log-every", "10", "--no-progress", "--output-dir", str(out)]
    code, output = kill_when(args, mnist_root, "Epoch 2, Batch 40")
    assert code == -signal.SIGKILL, output
    resumed = run_script(*args, "--resume", "auto", mnist=mnist_root)
    assert resumed.returncode == 0, resumed.stderr
    acc = accumulate(out / "tb")
    for tag in acc.Tags()["scalars"]:
        steps = [e.step for e in acc.Scalars(tag)]
        assert steps == sorted(set(steps)), (tag, steps)
    assert [e.step for e in acc.Scalars("accuracy/val")] == [60, 120, 180]
    assert [e.step for e in acc.Scalars("loss/train_step")] == list(range(10, 181, 10))


def test_piped_output_has_no_progress_noise_and_all_seed_lines(mnist_root, tmp_path):
    proc = run_script("--epochs", "1", "--limit-train-batches", "100", "--batch-size", "32", "--limit-val-batches",
                      "1", "--output-dir", str(tmp_path / "r"),
                      mnist=mnist_root)  # no --no-progress: the pipe alone switches the bars off
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stdout + proc.stderr and "it/s" not in proc.stderr
    summary, *lines = [line for line in proc.stdout.splitlines() if not line.startswith("--amp auto: ")]  # (a GPU's)
    assert summary.startswith("Model: 30,122 parameters (30,122 trainable)")  # at the first batch
    assert lines[:2] == [line for line in lines if "Batch" in line]
    assert lines[0].startswith("Epoch 1, Batch 50, Train Loss: ") and lines[1].startswith("Epoch 1, Batch 100, ")
    assert lines[2].startswith("Epoch 1, Train Loss: ") and lines[3].startswith("Epoch 1, Val Loss: ")
    assert any(line.startswith("TensorBoard: tensorboard --logdir ") for line in lines)


def test_an_epochs_scalars_are_in_the_file_when_its_logging_returns(tmp_path):
    from ignite.engine import Engine

    from handlers import TensorBoardLogging

    trainer = Engine(lambda e, b: None)
    tb = TensorBoardLogging(tmp_path / "tb", log_every=0, flush_secs=120)
    try:
        for epoch in (1, 2, 3):
            trainer.state.epoch, trainer.state.iteration = epoch, 10 * epoch
            trainer.state.metrics = {"val_accuracy": 0.9 + epoch / 100, "train_loss": 1.0 / epoch}
            tb.log_epoch(trainer)
            acc = accumulate(tmp_path / "tb")  # the writer is still open, its thread still running
            assert [e.step for e in acc.Scalars("accuracy/val")] == list(range(10, 10 * epoch + 1, 10))
    finally:
        tb.close()


@pytest.mark.parametrize("shape", [(1, 5, 5), (3, 4, 6), (5, 5)])
def test_the_collector_keeps_the_first_misclassified_samples_their_labels_and_all_the_counts(shape):
    import torch
    from ignite.engine import Engine

    from handlers.tensorboard import MisclassifiedCollector

    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(8, *shape, generator=g), torch.randn(8, 4, generator=g),
                torch.randint(0, 4, (8,), generator=g)) for _ in range(3)]

    def step(engine, batch):
        engine.state.inputs = batch[0]
        return batch[1], batch[2]

    evaluator = Engine(step)
    collector = MisclassifiedCollector(limit=5).attach(evaluator)
    evaluator.run(batches)
    wrong = [(x[i], int(p[i].argmax()), int(y[i])) for x, p, y in batches for i in range(8) if p[i].argmax() != y[i]]
    assert len(wrong) > 5  # the limit cuts inside a batch
    assert collector.labels == [(pred, true) for _, pred, true in wrong[:5]]
    for kept, (x, _, _) in zip(collector.images, wrong[:5], strict=True):
        assert torch.equal(kept, x.reshape(-1, *shape[-2:]))
    expected = torch.zeros(4, 4, dtype=torch.long)
    for _, p, y in batches:
        for pred, true in zip(p.argmax(1).tolist(), y.tolist()):
            expected[true, pred] += 1
    assert torch.equal(collector.confusion, expected)
