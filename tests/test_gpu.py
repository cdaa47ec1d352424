"""What only a GPU shows: the promises the rest of the suite checks on a CPU, kept on CUDA. Every test here is
marked ``gpu`` and skipped with one line where torch finds no CUDA device (tests/conftest.py)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from engine import RunSettings
from handlers import evaluate, fit, load_checkpoint, predict, seed_everything
from tests import forkserver
from tests.conftest import SCRIPT, run_main, run_script
from tests.test_distributed import torchrun_cmd
from tests.test_train_mnist import figures, final_weights, history
from tests.test_user_data import assert_same_tensors, in_this_process, newest_state, program

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
QUIET = dict(progress=False, log_every=0, patience=0)
MNIST_QUICK = ["--limit-train-batches", "60", "--limit-val-batches", "4", "--no-progress", "--log-every", "0"]


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    return x, (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0).long()


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveMaxPool2d(4),
                         nn.Flatten(), nn.Dropout(0.1), nn.Linear(128, 3))  # fmt: skip


def on(device: str, tensors: dict) -> bool:
    return all(t.device.type == device for t in tensors.values() if isinstance(t, torch.Tensor))


@pytest.mark.parametrize("kind, workers", [("fast", 0), ("augment", 2)])  # the memory path; a DataLoader
def test_deterministic_cuda_run_killed_mid_epoch_resumes_bit_exact(tmp_path, kind, workers):
    args = ["--kind", kind, "--num-workers", str(workers), "--save-every-iters", "2", "--seed", "4",
            "--device", "cuda", "--deterministic"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert in_this_process(*args, "--output-dir", str(straight)).returncode == 0
    assert program(*args, "--output-dir", str(killed), "--kill-at", "13").returncode == -9
    resumed = program(*args, "--output-dir", str(killed), "--resume", "auto")
    assert resumed.returncode == 0 and "iteration 12)" in resumed.stdout, resumed.stderr
    assert "without --deterministic" not in resumed.stdout
    config = json.loads((killed / "config.json").read_text())
    assert config["deterministic"] is True and config["device"].startswith("cuda")
    assert figures(history(killed)) == figures(history(straight))
    a, b = newest_state(straight), newest_state(killed)
    for key in ("model", "optimizer"):
        assert_same_tensors(a[key], b[key], key)


def test_a_cuda_resume_without_deterministic_says_once_that_it_is_not_bit_exact(tmp_path):
    args = ["--kind", "fast", "--save-every-iters", "2", "--seed", "4", "--device", "cuda", "--epochs", "2"]
    assert program(*args, "--output-dir", str(tmp_path / "r"), "--kill-at", "5").returncode == -9
    resumed = program(*args, "--output-dir", str(tmp_path / "r"), "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count("Resuming on CUDA without --deterministic") == 1


def test_the_default_recipe_repeats_bit_for_bit_with_deterministic(mnist_root, tmp_path):
    # FastNet ends in AdaptiveMaxPool2d, whose CUDA backward PyTorch refuses in deterministic mode: ours pools evenly
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        proc = run_script(*MNIST_QUICK, "--deterministic", "--output-dir", str(out), mnist=mnist_root)
        assert proc.returncode == 0, proc.stderr
    assert figures(history(runs[0])) == figures(history(runs[1]))
    a, b = final_weights(runs[0]), final_weights(runs[1])
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert history(runs[0])[0]["val_accuracy"] > 0.9


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_each_precision_with_accumulation_and_clipping_trains_on_cuda(mnist_root, tmp_path, amp):
    out = tmp_path / amp
    proc = run_main(*MNIST_QUICK, "--amp", amp, "--accumulation-steps", "2", "--clip-grad-norm", "1",
                    "--output-dir", str(out), mnist=mnist_root)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["precision"] == amp and config["device"].startswith("cuda")
    row = history(out)[0]
    assert math.isfinite(row["train_loss"]) and row["val_accuracy"] > 0.8
    state = load_checkpoint(next((out / "checkpoints").glob("last_iter=*.pt")))
    if amp == "fp16":
        assert state["scaler"]["scale"] > 0  # the grad scaler's state, saved
    else:
        assert "scaler" not in state


def test_compile_trains_on_cuda(mnist_root, tmp_path):
    proc = run_script(*MNIST_QUICK, "--compile", "--output-dir", str(tmp_path / "c"), mnist=mnist_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert history(tmp_path / "c")[0]["val_accuracy"] > 0.9


def test_lr_finder_and_ema_on_cuda_leave_the_model_where_it_was(tmp_path):
    seed_everything(0)
    model = net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cuda_rng = torch.cuda.get_rng_state()
    result = fit(model, data(640, 1), data(128, 2), RunSettings(output_dir=str(tmp_path / "f"), device="cuda",
                                                                find_lr=True, batch_size=32, **QUIET),
                 optimizer=optimizer)  # fmt: skip
    assert result.exit_code == 0 and (tmp_path / "f" / "lr_finder.json").exists()
    after = model.state_dict()
    assert on("cpu", after) and all(torch.equal(before[k], after[k]) for k in before)
    assert not optimizer.state  # the finder's steps were undone
    assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)  # its dropout's draws too
    ema = fit(model, data(640, 1), data(128, 2), RunSettings(output_dir=str(tmp_path / "e"), device="cuda", ema=0.9,
                                                             epochs=2, batch_size=32, **QUIET), optimizer=optimizer)
    assert ema.exit_code == 0 and "val_raw_accuracy" in ema.history[-1]
    assert on("cpu", model.state_dict()) and all(on("cpu", s) for s in optimizer.state.values())
    model(torch.randn(2, 3, 8, 8))  # the user's next call, with CPU inputs
    saved = load_checkpoint(ema.last_path)
    assert any(not torch.equal(saved["model"][k], saved["raw_model"][k]) for k in saved["model"])


def test_tensorboard_images_from_cuda_tensors(tmp_path):
    seed_everything(0)
    result = fit(net(), data(320, 1), data(128, 2), RunSettings(output_dir=str(tmp_path / "r"), device="cuda",
                                                                epochs=2, batch_size=32, **QUIET))
    assert result.exit_code == 0
    acc = EventAccumulator(str(tmp_path / "r" / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("val/confusion_matrix")] == [20]  # the last epoch's last iteration
    assert [e.step for e in acc.Images("val/misclassified")] == [20]


def test_a_cuda_checkpoint_is_evaluated_predicted_and_resumed_on_the_cpu(tmp_path):
    seed_everything(0)
    settings = RunSettings(output_dir=str(tmp_path / "r"), device="cuda", epochs=2, batch_size=32, **QUIET)
    result = fit(net(), data(320, 1), data(128, 2), settings)
    scores = {d: evaluate(net(), data(128, 2), RunSettings(device=d), checkpoint=result.best_path)
              for d in ("cuda", "cpu")}  # fmt: skip
    assert scores["cpu"]["samples"] == 128 and abs(scores["cpu"]["accuracy"] - scores["cuda"]["accuracy"]) <= 1 / 128
    assert predict(net(), data(16, 3)[0], RunSettings(device="cpu"), checkpoint=result.best_path).shape == (16, 3)
    seed_everything(0)
    more = RunSettings(output_dir=str(tmp_path / "r"), device="cpu", epochs=3, batch_size=32, resume="auto", **QUIET)
    resumed = fit(net(), data(320, 1), data(128, 2), more)
    assert resumed.exit_code == 0 and [r["epoch"] for r in resumed.history] == [1, 2, 3]
    assert json.loads((tmp_path / "r" / "config.json").read_text())["device"] == "cpu"


def test_a_model_on_cuda_trained_on_the_cpu_goes_back_to_cuda(tmp_path):
    model = net().cuda()
    fit(model, data(64, 1), data(32, 2), RunSettings(output_dir=str(tmp_path / "r"), device="cpu", epochs=1,
                                                     batch_size=32, tensorboard=False, **QUIET))  # fmt: skip
    assert on("cuda", model.state_dict())


def test_a_label_out_of_range_mid_run_is_one_line_and_cuda_still_works(tmp_path):
    # a loader's batches are checked on the host: no device-side assert, whose dead context would end the process
    x, y = data(96, 1)
    y[70] = 7  # in the 5th batch of 16, after the first-batch check

    class Samples(torch.utils.data.Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, i):
            return x[i], y[i]

    settings = RunSettings(output_dir=str(tmp_path / "r"), device="cuda", batch_size=16, data_path="loader", **QUIET)
    with pytest.raises(Exception, match=r"the training set holds class 7, but the model has 3 outputs .* \(found at "
                                        r"epoch 1, iteration 5\)"):
        fit(net(), Samples(), data(32, 2), settings)
    assert torch.ones(4, device="cuda").sum().item() == 4  # the context is alive


def test_more_processes_than_gpus_is_one_line_before_any_process_starts(mnist_root, tmp_path):
    n = torch.cuda.device_count() + 1
    proc = run_script("--nproc-per-node", str(n), "--output-dir", str(tmp_path / "r"), mnist=mnist_root)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: --nproc-per-node {n} asks for {n} processes on this machine, which has {n - 1} GPU(s): each process "
        f"trains on a GPU of its own; use --nproc-per-node {n - 1} (or fewer), or --device cpu for {n} CPU processes "
        f"(gloo)"]
    assert not (tmp_path / "r").exists()


def test_torchrun_with_more_processes_than_gpus_says_so_from_each_rank(mnist_root, tmp_path):
    n = torch.cuda.device_count() + 1
    cmd = torchrun_cmd(tmp_path / "logs")
    cmd[cmd.index("--nproc_per_node=2")] = f"--nproc_per_node={n}"
    proc = forkserver.run([*cmd, str(SCRIPT), "--output-dir", str(tmp_path / "r"), "--data-dir", str(mnist_root)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    # each rank says it (torchrun ends the others with SIGTERM as soon as the first has exited, so some may not get to)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert ours and set(ours) == {
        f"error: the launcher started {n} processes on this machine, which has {n - 1} GPU(s): each process trains on "
        f"a GPU of its own; use --nproc-per-node {n - 1} (or fewer), or --device cpu for {n} CPU processes (gloo)"}
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_no_host_sync_on_an_ordinary_iteration(tmp_path):
    # torch's own sync detector over a default run's training steps (with every default handler on)
    code = ("import sys, torch; sys.path.insert(0, '.')\n"
            "from ignite.engine import Events\n"
            "from engine import RunSettings\n"
            "from handlers import fit\n"
            "from tests.test_gpu import data, net\n"
            "class Watch:\n"
            "    def attach(self, trainer):\n"
            "        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3), lambda e: "
            "torch.cuda.set_sync_debug_mode('error'))\n"
            "        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=39), lambda e: "
            "torch.cuda.set_sync_debug_mode(0))\n"
            "        return self\n"
            f"fit(net(), data(1280, 1), data(64, 2), RunSettings(output_dir={str(tmp_path / 'r')!r}, device='cuda', "
            "epochs=1, batch_size=32, progress=False, log_every=50), handlers=[Watch()])\n"
            "print('done')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=str(SCRIPT.parent.parent))
    assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr[-3000:]
