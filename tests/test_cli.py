"""The command-line layer and the settings: flags, presets, messages naming flags or parameters,
exit codes. In-process, no training."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import pytest

from engine import CheckpointSaveError, ConfigError, RunSettings, flag_names, param
from handlers import RunResult, cli, launch
from tests.conftest import ROOT


@dataclasses.dataclass
class Mine(RunSettings):
    width: int = 8
    epochs: int = 4


def parse(*argv: str, presets=None) -> Mine:
    parser = cli.run_parser("test", Mine())
    parser.add_argument("--width", type=int)
    if presets:
        parser.add_argument("--preset", choices=sorted(presets), default=sorted(presets)[0])
    return cli.settings_from_args(parser.parse_args(list(argv)), Mine, presets)


def test_defaults_then_preset_then_flags():
    presets = {"a": {}, "b": {"epochs": 9, "lr": 0.5, "width": 2}}
    assert (parse().epochs, parse().width, parse().lr) == (4, 8, 1e-3)
    b = parse("--preset", "b", presets=presets)
    assert (b.epochs, b.lr, b.width) == (9, 0.5, 2)
    flags = parse("--preset", "b", "--epochs", "2", "--width", "5", "--no-tensorboard", "--no-download",
                  presets=presets)
    assert (flags.epochs, flags.lr, flags.width, flags.tensorboard, flags.download, flags.progress) == (
        2, 0.5, 5, False, False, True)


@pytest.mark.parametrize(
    "flags, needle",
    [(["--lr", "-1"], "--lr"), (["--batch-size", "0"], "--batch-size"), (["--patience", "-1"], "--patience"),
     (["--scheduler", "linear"], "--scheduler"), (["--lr", "nan"], "--lr"), (["--min-delta", "inf"], "--min-delta"),
     (["--amp", "fp8"], "--amp"), (["--nproc-per-node", "0"], "--nproc-per-node"), (["--mode", "up"], "--mode"),
     (["--epochs", "0"], "--epochs"), (["--beta1", "1"], "--beta1"), (["--beta2", "-0.1"], "--beta2")],
)
def test_invalid_flags_are_one_line_and_exit_2(capsys, flags, needle):
    with pytest.raises(SystemExit) as exit_info:
        cli.run_parser("test").parse_args(flags)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and needle in err and err.startswith("error: ")


@pytest.mark.parametrize(
    "kwargs, match",
    [({"epochs": 0}, "epochs must be a positive integer"), ({"lr": math.inf}, "lr must be a positive number"),
     ({"patience": -1}, "patience must be an integer >= 0"), ({"optimizer": "rmsprop"}, "optimizer must be one of"),
     ({"warmup_epochs": 3.0, "epochs": 3}, r"warmup_epochs \(3\) must be less than epochs \(3\)"),
     ({"mode": "up"}, "mode must be one of"), ({"save_every_iters": 0}, "save_every_iters"),
     ({"monitor": ""}, "monitor must be the name of a metric"), ({"beta1": 1.0}, r"beta1 is a moment decay"),
     ({"beta2": "0.9"}, r"beta2 is a moment decay")],
)
def test_settings_name_the_python_parameter(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        RunSettings(**kwargs)


def test_under_the_cli_messages_name_flags():
    parser = cli.run_parser("test")
    with flag_names(cli.flag_map(parser)):
        with pytest.raises(ConfigError, match=r"--warmup-epochs \(3\) must be less than --epochs \(3\)"):
            RunSettings(warmup_epochs=3.0, epochs=3)
        assert param("resume", "auto") == "--resume auto" and param("download") == "--no-download"
    assert param("resume", "auto") == "resume='auto'"  # the block restores the library's names


@pytest.mark.parametrize(
    "outcome, code, line",
    [(ConfigError("lr too high"), 2, "error: lr too high"), (CheckpointSaveError("disk full"), 1, "error: disk full"),
     (RunResult(3, Path(".")), 3, None), (RunResult(0, Path(".")), 0, None), (143, 143, None)],
)
def test_main_turns_each_ending_into_an_exit_code_and_at_most_one_line(capsys, outcome, code, line):
    seen = []

    def per_process(settings: Mine):
        seen.append(settings)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    parser = cli.run_parser("test", Mine())
    assert cli.main(per_process, parser, Mine, argv=["--epochs", "2"]) == code
    err = capsys.readouterr().err
    assert seen[0].epochs == 2 and isinstance(seen[0], Mine)
    assert err == (f"{line}\n" if line else "")


def test_nproc_per_node_under_a_launcher_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli.main(lambda s: 0, cli.run_parser("test"), argv=["--nproc-per-node", "2"]) == 2
    assert "--nproc-per-node spawns processes itself" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("profiled", [False, True])
def test_exit_process_exits_with_the_code_after_atexit_and_flushed_output(tmp_path, profiled):
    marker = tmp_path / "atexit-ran"
    script = tmp_path / "prog.py"
    script.write_text(
        "import atexit, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from handlers import cli\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('yes'))\n"
        "sys.stdout.write('unflushed line')\n"
        "cli.exit_process(3)\n")
    cmd = [sys.executable, *(["-m", "cProfile", "-o", str(tmp_path / "prof")] if profiled else []), str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3 or profiled, proc.stderr  # python -m cProfile exits 0 after sys.exit(3)
    assert proc.stdout == "unflushed line" and marker.read_text() == "yes"
    assert (tmp_path / "prof").exists() == profiled  # under a profiler: a plain sys.exit, its results written


@pytest.mark.parametrize("platform, accelerator, chosen, expected", [
    ("linux", False, None, "fork"),  # a CPU-only Linux machine: the ranks start with everything imported
    ("linux", True, None, "spawn"),  # CUDA (or another device) is not fork-safe
    ("darwin", False, None, "spawn"),
    ("win32", False, None, "spawn"),
    ("linux", False, "spawn", "spawn"),  # multiprocessing.set_start_method in the program wins
    ("linux", True, "forkserver", "forkserver"),
])  # fmt: skip
def test_nproc_per_node_forks_only_on_a_cpu_only_linux_machine_unless_the_program_chose(monkeypatch, platform,
                                                                                       accelerator, chosen, expected):
    monkeypatch.setattr(launch.sys, "platform", platform)
    monkeypatch.setattr(launch, "_accelerator_present", lambda: accelerator)
    monkeypatch.setattr(launch.multiprocessing, "get_start_method", lambda allow_none=False: chosen)
    assert launch.start_method() == expected


def test_no_accelerator_is_seen_on_this_cpu_only_machine():
    import torch

    assert launch._accelerator_present() == torch.cuda.is_available()  # the tests run without a GPU
