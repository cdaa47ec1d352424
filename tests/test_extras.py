"""What Lightning and fastai users reach for: the LR finder, weight EMA, the profile, the model summary,
replaying a run from its config; real runs on small synthetic data and on MNIST."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from engine import RunSettings
from handlers import fit, load_checkpoint, seed_everything
from tests import forkserver, user_program
from tests.conftest import in_process, run_main, run_script
from tests.test_train_mnist import figures, final_weights, history
from tests.test_user_data import PROGRAM, assert_same_tensors, newest_state

QUIET = dict(progress=False, log_every=0, patience=0)


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    return x, (x[:, 0].mean((1, 2)) > 0).long() + (x[:, 1].mean((1, 2)) > 0).long()


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(0.1), nn.Linear(512, 3))  # fmt: skip


def states(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    return ({k: v.clone() for k, v in model.state_dict().items()},
            json.loads(json.dumps(optimizer.state_dict(), default=str)))  # fmt: skip


def test_the_lr_finder_suggests_inside_its_range_and_leaves_model_and_optimizer_as_they_were(tmp_path, capsys):
    seed_everything(0)
    model = net()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = states(model, optimizer)
    rng = torch.get_rng_state()
    result = fit(model, data(640, 1), data(128, 2), RunSettings(output_dir=str(tmp_path / "r"), find_lr=True,
                                                                batch_size=32, **QUIET), optimizer=optimizer)
    assert result.exit_code == 0 and not (tmp_path / "r" / "checkpoints").exists()  # nothing trained
    after = states(model, optimizer)
    assert after[1] == before[1] and all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert torch.equal(torch.get_rng_state(), rng)
    found = json.loads((tmp_path / "r" / "lr_finder.json").read_text())
    low, high = found["range"]
    assert low <= found["suggestion"] <= high and len(found["lr"]) == len(found["loss"]) == 20  # one epoch
    assert (tmp_path / "r" / "lr_finder.png").stat().st_size > 10_000
    assert f"LR finder: suggested lr {found['suggestion']:.3g} (tried {low:.3g} to {high:.3g} over 20 batches" in \
        capsys.readouterr().out
    acc = EventAccumulator(str(tmp_path / "r" / "tb" / "lr_finder"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.value for e in acc.Scalars("lr_finder/lr")] == pytest.approx(found["lr"], rel=1e-6)


@pytest.mark.parametrize("path, workers", [("memory", 0), ("loader", 0), ("loader", 2)])
def test_lr_find_trains_at_the_suggestion_and_the_finder_does_not_change_the_run(tmp_path, path, workers):
    runs = {}
    for name, lr in (("found", "find"), ("given", None)):
        if lr is None:
            lr = json.loads((tmp_path / "found" / "config.json").read_text())["lr"]
        seed_everything(0)
        settings = RunSettings(output_dir=str(tmp_path / name), lr=lr, epochs=2, batch_size=32, data_path=path,
                               num_workers=workers, deterministic=True, **QUIET)  # bit-exact on a GPU too
        runs[name] = fit(net(), data(640, 1), data(128, 2), settings)
    config = json.loads((tmp_path / "found" / "config.json").read_text())
    assert config["lr"] == config["lr_finder"]["suggestion"]
    assert figures(runs["found"].history) == figures(runs["given"].history)  # the finder left no trace


def test_ema_validates_the_average_logs_the_raw_weights_and_keeps_the_average_as_best(tmp_path):
    seed_everything(0)
    model = net()
    result = fit(model, data(640, 1), data(128, 2), RunSettings(output_dir=str(tmp_path / "r"), ema=0.9, epochs=2,
                                                                batch_size=32, **QUIET))  # fmt: skip
    row = result.history[-1]
    assert {"val_accuracy", "val_raw_accuracy", "val_raw_loss"} <= set(row)
    best = load_checkpoint(result.best_path)
    raw = model.state_dict()
    assert set(best["model"]) == set(raw) and set(best["raw_model"]) == set(raw)
    assert not torch.equal(best["model"]["5.weight"], best["raw_model"]["5.weight"])  # the average, not the weights
    loaded = net()
    loaded.load_state_dict(best["model"])  # nothing special to load it


def test_ema_killed_mid_epoch_and_resumed_is_bit_exact(tmp_path):
    args = ["--kind", "augment", "--save-every-iters", "2", "--seed", "4", "--ema", "0.9", "--deterministic"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def go(*extra: str) -> subprocess.CompletedProcess:
        return forkserver.run([sys.executable, str(PROGRAM), *args, *extra], capture_output=True, text=True,
                              timeout=300, env=env)

    assert in_process(user_program.main, [*args, "--output-dir", str(tmp_path / "straight")]).returncode == 0
    assert go("--output-dir", str(tmp_path / "killed"), "--kill-at", "13").returncode == -9  # and its resume: processes
    resumed = go("--output-dir", str(tmp_path / "killed"), "--resume", "auto")
    assert resumed.returncode == 0 and "iteration 12)" in resumed.stdout, resumed.stderr
    a, b = newest_state(tmp_path / "straight"), newest_state(tmp_path / "killed")
    for key in ("model", "raw_model", "optimizer"):
        assert_same_tensors(a[key], b[key], key)
    assert figures(json.loads((tmp_path / "killed" / "history.json").read_text())) == \
        figures(json.loads((tmp_path / "straight" / "history.json").read_text()))


def test_profile_writes_a_table_naming_our_handlers(tmp_path, capsys):
    seed_everything(0)
    fit(net(), data(320, 1), data(64, 2), RunSettings(output_dir=str(tmp_path / "r"), profile=True, batch_size=32,
                                                      epochs=1, **QUIET))  # fmt: skip
    rows = json.loads((tmp_path / "r" / "profile.json").read_text())
    names = {r["handler"] for r in rows}
    assert {"trainer: Processing", "trainer: Dataflow", "trainer: TrainMetrics._update", "trainer: Validation",
            "trainer: TrainingCheckpoint", "trainer: NanGuard", "evaluator: Processing"} <= names
    assert [r["total_s"] for r in rows] == sorted((r["total_s"] for r in rows), reverse=True)
    assert next(r for r in rows if r["handler"] == "trainer: Processing")["calls"] == 10
    out = capsys.readouterr().out
    assert "handler" in out and "trainer: TrainMetrics._update" in out and "Profile: " in out


def test_nothing_is_profiled_by_default(tmp_path):
    seed_everything(0)
    fit(net(), data(64, 1), data(32, 2), RunSettings(output_dir=str(tmp_path / "r"), batch_size=32, epochs=1,
                                                     **QUIET))  # fmt: skip
    assert not (tmp_path / "r" / "profile.json").exists()


def test_the_model_summary_counts_the_parameters(tmp_path, capsys):
    seed_everything(0)
    model = net()
    fit(model, data(64, 1), data(32, 2), RunSettings(output_dir=str(tmp_path / "r"), batch_size=16, epochs=1,
                                                     **QUIET))  # fmt: skip
    count = sum(p.numel() for p in model.parameters())
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("Model: "))
    assert line.startswith(f"Model: {count:,} parameters ({count:,} trainable), ")
    assert line.endswith("input [16, 3, 8, 8] -> output [16, 3]")
    summary = json.loads((tmp_path / "r" / "config.json").read_text())["model_summary"]
    assert summary["parameters"] == count and summary["input_shape"] == [16, 3, 8, 8]
    acc = EventAccumulator(str(tmp_path / "r" / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    assert "model/text_summary" in acc.Tags()["tensors"]


@pytest.mark.slow
def test_a_run_replayed_from_its_config_json_ends_bit_for_bit_equal(mnist_root, tmp_path):
    first = tmp_path / "first"
    args = ["--limit-train-batches", "20", "--limit-val-batches", "1", "--epochs", "2", "--no-progress", "--seed", "7",
            "--lr", "0.004", "--deterministic"]  # (bit for bit on a GPU too: the replay takes it from config.json)
    assert run_main(*args, "--output-dir", str(first), mnist=mnist_root).returncode == 0  # the replay: a process
    again = tmp_path / "again"
    proc = run_script("--config", str(first / "config.json"), "--output-dir", str(again), "--no-progress", mnist=None)
    assert proc.returncode == 0, proc.stderr
    assert figures(history(again)) == figures(history(first))
    a, b = final_weights(first), final_weights(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    config = json.loads((again / "config.json").read_text())
    assert (config["lr"], config["seed"], config["limit_train_batches"]) == (0.004, 7, 20)


@pytest.mark.slow
def test_a_config_with_an_unknown_key_is_one_line_and_a_toml_config_with_flags_on_top_works(mnist_root, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"epochs": 1, "learning_rate": 0.1}))
    proc = run_script("--config", str(bad), "--output-dir", str(tmp_path / "r"), mnist=mnist_root)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: --config {bad}: unknown setting(s) 'learning_rate'; a setting is one of the flags of --help (as "
        f"its name: --warmup-epochs is warmup_epochs)"]
    toml = tmp_path / "run.toml"
    toml.write_text('epochs = 1\nlimit_train_batches = 10\nlr = 0.003\nlog_every = 0\n')
    proc = run_main("--config", str(toml), "--lr", "0.002", "--output-dir", str(tmp_path / "t"), "--no-progress",
                    mnist=mnist_root)  # in-process, after the refusal in a real process
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert (config["epochs"], config["limit_train_batches"], config["lr"]) == (1, 10, 0.002)
