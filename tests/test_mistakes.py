"""The ordinary mistakes of a user's own program (tests/mistake_program.py, real subprocesses through
`cli.main`): each ends in one line of ours that names the cause (a bug in their code: their frames
only, then that line), the right exit code, and a run folder the mended command can use at once."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from engine import ConfigError, RunSettings
from handlers import fit, seed_everything
from tests import forkserver, mistake_program
from tests.conftest import in_process

PROGRAM = Path(__file__).resolve().parent / "mistake_program.py"
pytestmark = pytest.mark.slow


def program(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return forkserver.run([sys.executable, str(PROGRAM), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def in_this_process(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The same program through its ``main(argv)`` in this process: the cases after a kind's first."""
    return in_process(mistake_program.main, list(args), env)


def mended_rerun_works(out: Path, capsys) -> None:
    """The same command with the mistake mended, same folder, no --resume: it trains to the end (saying
    so in one line where the failed run had begun writing). In-process, through the same ``cli.main``
    (the failing run before it was the real process)."""
    started = (out / "config.json").exists()
    capsys.readouterr()
    code = mistake_program.main(["--case", "ok", "--output-dir", str(out)])
    again = capsys.readouterr()
    assert code == 0, again.err
    said = "holds no checkpoint (the run there ended before its first save): starting afresh in it" in again.out
    assert said == started


@pytest.mark.parametrize("case, extra, line", [  # the first a real process, the others in-process
    ("float-targets", [], "error: the training set's targets are float32, but class labels must be integers: "
                          "convert them with .long() (or pass classification=False for regression)"),
    ("target-out-of-range", [], "error: the training set holds class 5, but the model has 3 outputs (classes 0 to "
                                "2): give the model 6 outputs, or map the labels to 0..2"),
    ("late-target-out-of-range", [], "error: the training set holds class 5, but the model has 3 outputs (classes 0 "
                                     "to 2): give the model 6 outputs, or map the labels to 0..2 (found at epoch "),
    ("lengths", ["--data-path", "loader"], "error: the training set's inputs and targets differ in length: 96 "
                                           "inputs, 90 targets"),
    ("regression-shapes", [], "error: the model's output [16, 3] and the training set's targets [16] differ in "
                              "shape, so the loss would broadcast them (or fail)"),
    ("empty-validation", ["--data-path", "loader"], "error: the validation set is empty"),
    ("float64-inputs", [], "error: the training set's inputs are float64, but the model's parameters are float32 (mat1 "
                           "and mat2 must have the same dtype, but got Double and Float): convert them with .float() "
                           "(NumPy arrays are float64: torch.from_numpy(a).float())"),
    ("uint8-inputs", [], "error: the training set's inputs are uint8, but the model's parameters are float32 (mat1 "
                         "and mat2 must have the same dtype, but got Byte and Float): convert them with .float() "
                         "(pixels: x.float() / 255)"),
    ("list-inputs", [], "error: the training set's inputs reach the model as a list of 4, which it cannot take "
                        "(linear(): argument 'input' (position 1) must be Tensor, not list): return a tensor from "
                        "__getitem__"),
    ("list-targets", [], "error: the loss cannot take the model's output [16, 3] and the training set's targets (a "
                         "list of 1): cross_entropy_loss(): argument 'target' (position 2) must be Tensor, not list: "
                         "return each target as a number or a tensor from __getitem__, not a Python list"),
    ("ragged-samples", [], "error: the training set's samples cannot be stacked into a batch (stack expects each "
                           "tensor to be equal size, but got [2] at entry 0 and [3] at entry 1): make them one shape"),
    ("a-dataloader", [], "error: the training data is a DataLoader: pass its dataset (loader.dataset) instead; fit "
                         "builds the loader itself, from --batch-size and --num-workers"),
    ("no-validation", [], "error: no validation data was given (None): fit validates every epoch; pass a held-out "
                          "set"),
])  # fmt: skip
def test_a_data_mistake_is_one_line_exit_2_and_the_folder_stays_usable(tmp_path, capsys, case, extra, line):
    out = tmp_path / "run"
    proc = (program if case == "float-targets" else in_this_process)("--case", case, "--output-dir", str(out), *extra)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(line), proc.stderr
    if case != "late-target-out-of-range":  # found before the first step: nothing written at all
        assert not out.exists()
    mended_rerun_works(out, capsys)


@pytest.mark.parametrize("case, extra, frame, line", [
    ("forward-bug", [], "in forward", "error: ValueError: my bug in forward (epoch 1, iteration "),
    ("getitem-bug", ["--num-workers", "2"], "in __getitem__",
     "error: KeyError: 'sample 50 is missing' (in a DataLoader worker, epoch 1, iteration "),
    ("getitem-bug", [], "in __getitem__", "error: KeyError: 'sample 50 is missing' (epoch 1, iteration "),
])  # fmt: skip
def test_a_bug_in_the_users_code_shows_their_frames_only_then_one_line(tmp_path, capsys, case, extra, frame,
                                                                        line):
    out = tmp_path / "run"
    proc = program("--case", case, "--output-dir", str(out), *extra)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("Traceback (most recent call last; your code only, TRAINER_FULL_TRACEBACK=1")
    assert lines[-1].startswith(line) and lines[-1].endswith("checkpoints already saved are intact)")
    files = [entry.split('"')[1] for entry in lines if entry.startswith('  File "')]
    assert files and set(files) == {str(PROGRAM)} and any(frame in entry for entry in lines)
    full = in_this_process("--case", case, "--output-dir", str(tmp_path / "full"), *extra,
                           env={"TRAINER_FULL_TRACEBACK": "1"})  # the whole traceback: in-process
    assert full.returncode == 1 and "site-packages" in full.stderr and full.stderr.strip().splitlines()[-1] == lines[-1]
    mended_rerun_works(out, capsys)


def test_ragged_samples_train_with_a_collate_fn_which_batches_both_sets(tmp_path):
    # the mended form of "ragged-samples": a padding collate_fn, which the tensors of the validation set
    # go through too (data_path auto sends them to the loader); data_path memory is refused in one line
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 4, generator=g), torch.randint(0, 3, (96,), generator=g)
    sizes: list[int] = []

    def pad(samples: list) -> tuple[torch.Tensor, torch.Tensor]:
        sizes.append(len(samples))
        inputs = torch.zeros(len(samples), 4)
        for i, (sample, _) in enumerate(samples):
            inputs[i, : len(sample)] = sample
        return inputs, torch.stack([target for _, target in samples])

    settings = RunSettings(epochs=1, batch_size=16, val_batch_size=32, progress=False, log_every=0, tensorboard=False,
                           output_dir=str(tmp_path / "run"))
    result = fit(mistake_program.Net(), mistake_program.Samples(x, y, form="ragged-samples"), (x[:32], y[:32]),
                 settings, collate_fn=pad)
    assert result.exit_code == 0 and [row["epoch"] for row in result.history] == [1]
    assert result.history[0]["val_samples"] == 32 and sizes.count(32) == 1  # the validation batch: collated
    assert sizes.count(16) >= 6  # the six training batches (and the checks' first samples)
    memory = dataclasses.replace(settings, data_path="memory", output_dir=str(tmp_path / "memory"))
    with pytest.raises(ConfigError, match="^a collate_fn makes batches on the loader path; "):
        fit(mistake_program.Net(), (x, y), (x[:32], y[:32]), memory, collate_fn=pad)
    assert not (tmp_path / "memory").exists()


def test_nan_in_the_inputs_blames_the_data_not_the_learning_rate(tmp_path, capsys):
    proc = program("--case", "nan-inputs", "--output-dir", str(tmp_path / "run"))
    assert proc.returncode == 3
    stopped = [line for line in proc.stdout.splitlines() if line.startswith("Stopped:")]
    assert len(stopped) == 1 and "holds NaN or infinite inputs (sample(s) " in stopped[0]
    assert "the data is at fault" in stopped[0] and "--lr" not in stopped[0]
    mended_rerun_works(tmp_path / "run", capsys)


def test_a_run_folder_holding_a_checkpoint_is_still_refused_without_resume(tmp_path):
    out = tmp_path / "run"
    assert mistake_program.main(["--case", "ok", "--output-dir", str(out)]) == 0  # in-process; the refusal: real
    again = program("--case", "ok", "--output-dir", str(out))
    assert again.returncode == 2 and "already holds a run: pass --resume auto" in again.stderr


def test_fit_called_directly_is_as_quiet_as_cli_main(tmp_path, capfd):
    seed_everything(0)
    x, y = torch.randn(64, 4), torch.randint(0, 2, (64,))
    fit(nn.Linear(4, 2), (x, y), (x, y), RunSettings(output_dir=str(tmp_path / "r"), epochs=6, patience=1,
                                                     min_delta=1.0, progress=False, log_every=0))  # fmt: skip
    with pytest.raises(RuntimeError, match="boom"):
        fit(nn.Linear(4, 2), (x, y), (x, y), RunSettings(output_dir=str(tmp_path / "s"), progress=False, log_every=0),
            handlers=[Boom()])
    captured = capfd.readouterr()
    assert "ignite" not in captured.err and "ignite" not in captured.out and "Engine run is terminating" not in (
        captured.err + captured.out)
    assert "Early stopping" in captured.out or "early" in captured.out.lower()


class Boom:
    def attach(self, trainer) -> None:
        from ignite.engine import Events

        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3), self)

    def __call__(self, engine) -> None:
        raise RuntimeError("boom")


def test_on_a_tie_every_report_names_the_first_best_epoch(tmp_path, capsys):
    seed_everything(0)
    x = torch.randn(128, 4)
    y = (x[:, 0] > 0).long()
    x[:, 0] += 3 * (2 * y - 1)  # a wide margin: validation accuracy reaches 1.0 at once and stays there
    result = fit(nn.Linear(4, 2), (x, y), (x, y), RunSettings(output_dir=str(tmp_path / "r"), epochs=5, lr=0.1,
                                                              batch_size=16, patience=0, progress=False, log_every=0))
    accuracies = [row["val_accuracy"] for row in result.history]
    first = accuracies.index(max(accuracies)) + 1
    assert accuracies.count(max(accuracies)) >= 2  # a tie
    assert result.best["epoch"] == first
    assert result.best_path.name.startswith(f"best_epoch={first}_")
    assert f"at epoch {first} (" in capsys.readouterr().out
    kept = sorted((tmp_path / "r" / "checkpoints").glob("best_*.pt"))
    assert kept[0].name.startswith(f"best_epoch={first}_")
    acc = EventAccumulator(str(tmp_path / "r" / "tb" / "hparams"), size_guidance={"scalars": 0})
    acc.Reload()
    assert acc.Scalars("hparam/best_epoch")[0].value == first
    assert acc.Scalars("hparam/best_val_accuracy")[0].value == max(accuracies)
