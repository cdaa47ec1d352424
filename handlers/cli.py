"""The command-line layer: the run flags, settings from flags, and a ``main`` with our exit codes.

    parser = run_parser("Train my model.")                 # every run flag (--epochs, --resume, ...)
    parser.add_argument("--width", type=int, default=16)    # and your own
    sys.exit(main(train, parser, MySettings))               # train(settings) -> RunResult, per process

``main`` parses the flags into your settings dataclass (defaults, then ``presets[--preset]``, then the
flags given), launches the processes (one; several under torchrun; ``--nproc-per-node N`` spawns N),
and turns every way a run can end into an exit code with at most one line of ours on stderr:
0 done, 1 a save failed, 2 bad input (flags, data, checkpoint), 3 a non-finite loss, 4 another process
of the run died, 130/143 a stop signal.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import dataclasses
import gc
import math
import multiprocessing
import os
import signal
import socket
import sys
from typing import Any, Callable, Mapping, NoReturn, TypeVar

import ignite.distributed as idist
import torch

from engine import distributed
from engine.determinism import prepare_environment
from engine.device import RunDevice, check_processes, keep_off_gpus, resolve_device
from engine.errors import EXIT_PEER, EXIT_SAVE, EXIT_USAGE, CheckpointSaveError, ConfigError, flag_names, param
from engine.settings import OPTIMIZERS, SCHEDULERS, RunSettings
from handlers.config_file import load_config, settings_in_config
from handlers.console import flush_output, quiet_ignite
from handlers.rng import seed_everything
from handlers.run import RunResult
from handlers.signals import LastLines, StopSignal
from handlers.user_errors import FULL_TRACEBACK_ENV, report_failure

__all__ = ["OneLineParser", "add_run_arguments", "exit_process", "launch", "main", "run_parser", "settings_from_args"]

S = TypeVar("S", bound=RunSettings)
PerProcess = Callable[[Any], "RunResult | int"]
_NEGATED = ("download", "progress", "tensorboard")  # set by --no-<name>


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag costs one line on stderr (and exit code 2), not the whole usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"error: {message} (see --help)\n")


def _checked(kind: Callable[[str], Any], test: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse


positive_int = _checked(int, lambda v: v > 0, "a positive integer")
non_negative_int = _checked(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _checked(float, lambda v: v > 0 and math.isfinite(v), "a positive number")


def _lr(text: str) -> float | str:
    return "find" if text == "find" else positive_float(text)


_lr.__name__ = "float"
non_negative_float = _checked(float, lambda v: v >= 0 and math.isfinite(v), "a number >= 0")
moment_decay = _checked(float, lambda v: 0 <= v < 1, "a number in [0, 1), e.g. 0.9")


def add_run_arguments(parser: argparse.ArgumentParser, defaults: RunSettings | None = None,
                      data_env: str | None = None) -> argparse.ArgumentParser:  # fmt: skip
    """Add every run flag to ``parser``. Recipe flags default to ``None`` (then the preset or the
    settings class decides); the others show ``defaults`` (a settings instance) in ``--help``.
    ``data_env`` names an environment variable that ``--data-dir`` defaults to when set."""
    d = defaults or RunSettings()
    p = parser
    p.add_argument("--data-dir", default=(os.environ.get(data_env) if data_env else None) or d.data_dir,
                   help=f"data folder (default: ${data_env}, else {d.data_dir})" if data_env else "data folder")
    p.add_argument("--no-download", action="store_true", help="never try to download the data")
    p.add_argument("--output-dir", default=None, help="run folder (default: runs/<name>-<timestamp>)")
    p.add_argument("--resume", default=None, help="'auto' (newest valid last_*.pt in --output-dir) or a path")
    p.add_argument("--config", default=None, metavar="PATH",
                   help="every setting from a run's config.json (or a TOML file with its keys); flags given override")
    g = p.add_argument_group("recipe (default: from --preset)")
    g.add_argument("--optimizer", choices=list(OPTIMIZERS))
    g.add_argument("--epochs", type=positive_int)
    g.add_argument("--batch-size", type=positive_int, help="global: shared among processes")
    g.add_argument("--val-batch-size", type=positive_int)
    g.add_argument("--lr", type=_lr, help="a positive number, or 'find': run the LR finder, train at its suggestion")
    g.add_argument("--beta1", type=moment_decay, help="Adam's first moment decay (adam, adamw)")
    g.add_argument("--beta2", type=moment_decay, help="Adam's second moment decay (adam, adamw)")
    g.add_argument("--weight-decay", type=non_negative_float)
    g.add_argument("--label-smoothing", type=non_negative_float)
    g.add_argument("--scheduler", choices=list(SCHEDULERS))
    g.add_argument("--warmup-epochs", type=non_negative_float)
    g.add_argument("--data-path", choices=["auto", "memory", "loader", "torchvision"],
                   help="auto: tensors on the device, any other Dataset through a DataLoader; memory: read into "
                        "tensors on the device; loader: a DataLoader (torchvision: its old name)")
    g = p.add_argument_group("handlers")
    g.add_argument("--monitor", default=d.monitor,
                   help="metric that early stopping, best checkpoints and plateau LR follow (default: val_accuracy, "
                        "val_loss without accuracy)")
    g.add_argument("--mode", choices=["max", "min"], default=d.mode,
                   help="direction of --monitor (default: min for a loss or error, else max)")
    g.add_argument("--val-every", type=positive_int, default=d.val_every,
                   help="validate every N epochs (and after the last)")
    g.add_argument("--patience", type=non_negative_int, default=d.patience, help="early stopping; 0 switches it off")
    g.add_argument("--min-delta", type=non_negative_float, default=d.min_delta)
    g.add_argument("--early-stop-warmup", type=non_negative_int, default=d.early_stop_warmup,
                   help="epochs never judged")
    g.add_argument("--n-saved", type=positive_int, default=d.n_saved, help="best checkpoints kept")
    g.add_argument("--save-every-iters", type=positive_int, default=d.save_every_iters,
                   help="also save last_*.pt every N iterations (mid-epoch, exact resume)")
    g.add_argument("--log-every", type=non_negative_int, default=d.log_every,
                   help="batch lines every N batches (0: none)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (also off when not a terminal)")
    g.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard event files")
    g.add_argument("--tb-histograms", action="store_true", help="weight and gradient histograms (cost time)")
    g.add_argument("--tb-images-every", type=non_negative_int, default=d.tb_images_every,
                   help="confusion matrix and misclassified samples every N epochs (0: after the last only)")
    g = p.add_argument_group("engine")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N or mps")
    g.add_argument("--deterministic", action="store_true", default=None,
                   help="deterministic kernels (CUDA too): a resumed run repeats an uninterrupted one bit for bit")
    g.add_argument("--num-workers", type=non_negative_int, default=d.num_workers, help="DataLoader workers")
    g.add_argument("--limit-train-batches", type=positive_int, default=d.limit_train_batches,
                   help="cap training batches per epoch")
    g.add_argument("--limit-val-batches", type=positive_int, default=d.limit_val_batches,
                   help="validate on the first N batches of the validation set only (quick checks)")
    g.add_argument("--epoch-length", type=positive_int, default=d.epoch_length,
                   help="batches per epoch of a stream (IterableDataset); default: one pass")
    g.add_argument("--amp", choices=["auto", "fp32", "bf16", "fp16"], default=d.amp,
                   help="precision; auto: bf16 where the hardware computes it natively, else fp32")
    g.add_argument("--accumulation-steps", type=positive_int, default=d.accumulation_steps)
    g.add_argument("--clip-grad-norm", type=positive_float, default=d.clip_grad_norm)
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--threads", type=positive_int, default=d.threads, help="torch CPU threads")
    g = p.add_argument_group("extras")
    g.add_argument("--find-lr", action="store_true", default=None,
                   help="run the LR finder (at most one epoch, --limit-train-batches caps it): its suggestion, "
                        "lr_finder.png and .json in --output-dir; trains nothing")
    g.add_argument("--ema", type=_checked(float, lambda v: 0 < v < 1, "a number between 0 and 1"), default=d.ema,
                   metavar="DECAY", help="validate and keep the moving average of the weights (e.g. 0.999)")
    g.add_argument("--profile", action="store_true", default=None,
                   help="time every handler: a table at the end, profile.json in --output-dir")
    g.add_argument("--full-traceback", action="store_true",
                   help=f"on an error in your code, every frame (not only yours); also {FULL_TRACEBACK_ENV}=1")
    g = p.add_argument_group("distributed (or launch with torchrun)")
    g.add_argument("--nproc-per-node", type=positive_int, default=None,
                   help="spawn this many processes here (as torchrun would); --batch-size stays global")
    g.add_argument("--backend", choices=["gloo", "nccl"], default=None, help="default: nccl with CUDA, else gloo")
    return p


def run_parser(description: str, defaults: RunSettings | None = None, data_env: str | None = None) -> OneLineParser:
    """A :class:`OneLineParser` with every run flag (see :func:`add_run_arguments`)."""
    parser = OneLineParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    return add_run_arguments(parser, defaults, data_env)


def flag_map(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Setting name -> the flag that sets it, for messages (``warmup_epochs`` -> ``--warmup-epochs``)."""
    flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings and a.dest != "help"}
    flags.update({name: flags["no_" + name] for name in _NEGATED if "no_" + name in flags})
    return flags


def settings_from_args(args: argparse.Namespace, cls: type[S] = RunSettings,  # type: ignore[assignment]
                       presets: Mapping[str, Mapping[str, Any]] | None = None,
                       explicit: set[str] | None = None) -> S:  # fmt: skip
    """``cls`` built from its defaults, then ``presets[args.preset]`` (if any), then the settings of
    ``args.config`` (``--config``: a run's config.json or a TOML file), then every flag that has a value
    (recipe flags default to ``None``: not given, the preset or the class default stands). With a
    config file only the flags in ``explicit`` (given on the command line) override it."""
    config = getattr(args, "config", None)
    from_file = settings_in_config(load_config(config), cls, config) if config else {}
    preset = getattr(args, "preset", None)
    if config and "preset" in from_file and not (explicit and "preset" in explicit):
        preset = from_file["preset"]
    values = dict(presets[preset]) if presets and preset in presets else {}
    values.update(from_file)
    given = dict(vars(args))
    if config and explicit is not None:
        given = {k: v for k, v in given.items() if k in explicit}
    for name in _NEGATED:  # --no-<name> given: off; not given: the preset's or the class's default stands
        if given.pop("no_" + name, False):
            given[name] = False
    fields = {f.name for f in dataclasses.fields(cls)}
    for key, value in given.items():
        if key in fields and value is not None:
            values[key] = value
    return cls(**values)


def given_on_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations of the options written on the command line (not filled in by defaults)."""
    probe = copy.deepcopy(parser)
    for action in probe._actions:
        action.default = argparse.SUPPRESS
        action.required = False
    namespace, _ = probe.parse_known_args(argv)
    return set(vars(namespace))


def _one_process(per_process: PerProcess, settings: RunSettings) -> int:
    seed_everything(settings.seed)  # before the model is built: its initial weights come from it
    result = per_process(settings)
    return result.exit_code if isinstance(result, RunResult) else int(result or 0)


def _leave_together() -> None:
    """Every rank waits here for the others before the process group is torn down: a rank that tore
    its gloo group down while rank 0 was still writing the last records was seen to abort at exit."""
    if idist.get_world_size() > 1:
        idist.barrier()


def _in_group(per_process: PerProcess, settings: RunSettings, backend: str, quiet: bool = False) -> int:
    """One rank of a launched run: join the group, train, leave together. Another rank dying ends
    this one with one line naming it (none with ``quiet``: the spawning parent says it) and
    :data:`EXIT_PEER`, without a traceback."""
    distributed.init_process_group(backend)
    try:
        code = _one_process(per_process, settings)
        _leave_together()
        return code
    except Exception as exc:
        if not distributed.is_peer_failure(exc):
            raise
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the launcher's SIGTERM must not cut our line off
        if not quiet:
            lost = distributed.PeerLost(distributed.missing_ranks(), idist.get_rank())
            print(f"error: {lost}; checkpoints already saved are intact: continue with {param('resume', 'auto')} "
                  f"(torchrun --max-restarts does it by itself)", file=sys.stderr, flush=True)
        return EXIT_PEER
    finally:
        # The process group lives on in whatever still holds it (DDP's reducer, in a reference cycle
        # of the engines): free that now, while the interpreter is whole. Left to its finalisation, a
        # rank was seen to abort at exit ("terminate called without an active exception", 1 run in ~30).
        gc.collect()  # seen here: without it the DDP model is still alive at this point
        distributed.destroy()


def _spawned(local_rank: int, per_process: PerProcess, settings: RunSettings, flags: dict[str, str],
             env: dict[str, str], backend: str) -> None:  # fmt: skip
    """A process spawned by ``--nproc-per-node``: errors end it with our exit codes, as a script would."""
    os.environ.update(env, RANK=str(local_rank), LOCAL_RANK=str(local_rank))
    with flag_names(flags):
        code = _guarded(lambda: _in_group(per_process, settings, backend, quiet=True))
    sys.exit(code)


def _spawn(per_process: PerProcess, settings: RunSettings, flags: dict[str, str], backend: str) -> int:
    """``settings.nproc_per_node`` processes here, each a rank of the run (as torchrun would start them)."""
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException, start_processes

    n = settings.nproc_per_node
    env = {"WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}  # fmt: skip
    context = start_processes(_spawned, args=(per_process, settings, flags, env, backend), nprocs=n, join=False,
                              start_method=start_method())
    try:
        while not context.join(grace_period=10):  # the others get 10 s to notice and leave by themselves
            pass
    except ProcessExitedException as exc:
        if exc.exit_code > 0:  # it said why itself
            return exc.exit_code
        print(f"error: rank {exc.error_index} of the run (pid {exc.error_pid}) was killed by {exc.signal_name}; "
              f"checkpoints already saved are intact: continue with {param('resume', 'auto')}", file=sys.stderr)
        return EXIT_PEER
    except ProcessRaisedException as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else "a training process failed"
        print(f"error: rank {exc.error_index} of the run failed: {last}", file=sys.stderr)
        return 1
    return 0


def start_method() -> str:
    """How ``--nproc-per-node`` starts its processes: the method set with ``multiprocessing.set_start_method``
    if the program set one; else ``"fork"`` on Linux without any accelerator (each rank starts with
    everything already imported: a 40-batch MNIST run of 2 ranks took 8.2-9.1 s instead of 14.1-14.4 s
    on a 2-core CPU), and ``"spawn"`` anywhere else (CUDA and other devices are not fork-safe, macOS
    frameworks neither). A run on the CPU hides the GPUs from its processes first (``--device cpu``):
    then it forks on a GPU machine too."""
    chosen = multiprocessing.get_start_method(allow_none=True)
    if chosen is not None:
        return chosen
    if sys.platform.startswith("linux") and not _accelerator_present():
        return "fork"
    return "spawn"


def _accelerator_present() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ...
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(per_process: PerProcess, settings: RunSettings, flags: Mapping[str, str] | None = None) -> int:
    """Run ``per_process(settings)`` here, in each process torchrun started, or in
    ``settings.nproc_per_node`` processes spawned here; the exit code of the run."""
    prepare_environment(settings.deterministic)  # before CUDA starts here or in any process started below
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # by torchrun (or another launcher)
    spawning = bool(settings.nproc_per_node and settings.nproc_per_node > 1)
    if spawning and launched:
        raise ConfigError(f"{param('nproc_per_node')} spawns processes itself: do not also launch with torchrun")
    if (spawning or launched) and settings.device == "cpu":
        keep_off_gpus()  # a CPU run's processes (and their collectives) never touch a GPU
    if spawning:
        check_processes(settings.device, settings.nproc_per_node)  # before any process starts
        backend = settings.backend or RunDevice(resolve_device(settings.device)).backend  # CUDA not started
        return _spawn(per_process, settings, dict(flags or {}), backend)
    if launched:  # rank and world from the launcher's environment
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        device = RunDevice.of(settings.device, local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                              local_world_size=local)  # every rank says it, before the group forms
        return _in_group(per_process, settings, settings.backend or device.backend)
    return _one_process(per_process, settings)


def _guarded(body: Callable[[], int]) -> int:
    """``body()``, with every way a user's run can fail turned into one line and an exit code."""
    try:
        return body()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CheckpointSaveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_SAVE
    except KeyboardInterrupt as exc:  # before any run of this process had started (then each run answers its own)
        signum = exc.signum if isinstance(exc, StopSignal) else signal.SIGINT
        print(f"Interrupted by {signal.Signals(signum).name} before training started; nothing was saved",
              file=sys.stderr)
        return 128 + signum
    except OSError as exc:  # disk full or read-only outside checkpointing (history, config, events)
        if exc.errno is None:  # an OSError of the user's own code, not of the disk
            report_failure(exc)
            return 1
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}; checkpoints already saved are intact",
              file=sys.stderr)
        return EXIT_SAVE
    except Exception as exc:  # a bug in the user's code (model, loss, data set, handler): their frames, one line
        report_failure(exc)
        return 1


def main(per_process: PerProcess, parser: argparse.ArgumentParser, settings_cls: type[RunSettings] = RunSettings,
         presets: Mapping[str, Mapping[str, Any]] | None = None, argv: list[str] | None = None) -> int:  # fmt: skip
    """Parse ``argv`` into ``settings_cls``, launch ``per_process`` (see :func:`launch`); the exit code.

    ``per_process(settings)`` trains in one process and returns a :class:`RunResult` (what
    :func:`handlers.fit` returns) or an exit code. The global RNG is seeded with ``settings.seed``
    before it is called. Messages name settings by their flags (``--warmup-epochs``).
    """
    quiet_ignite()
    flags = flag_map(parser)
    last = LastLines().install()  # until the process exits: a signal after the run is answered, never a traceback
    _state["last"] = last
    with flag_names(flags):
        args = parser.parse_args(argv)
        if getattr(args, "full_traceback", False):
            os.environ[FULL_TRACEBACK_ENV] = "1"  # spawned processes inherit it
        explicit = given_on_command_line(parser, argv) if getattr(args, "config", None) else None
        code = _guarded(lambda: launch(per_process, settings_from_args(args, settings_cls, presets, explicit), flags))
    return _with_late_signal(code)


_state: dict[str, LastLines | None] = {"last": None}


def _with_late_signal(code: int) -> int:
    """A run that ended well but got a stop signal afterwards exits as stopped by it (128 + signal)."""
    last = _state.get("last")
    if code == 0 and last is not None and last.received is not None:
        return 128 + last.received
    return code


def _observed() -> bool:
    """Whether a tracer or profiler watches this process: ``sys.settrace``/``sys.setprofile``, or
    (Python >= 3.12) a tool registered with ``sys.monitoring`` (cProfile, coverage, debuggers)."""
    if sys.gettrace() is not None or sys.getprofile() is not None:
        return True
    monitoring = getattr(sys, "monitoring", None)
    return monitoring is not None and any(monitoring.get_tool(tool) is not None for tool in range(6))


def exit_process(code: int) -> NoReturn:
    """End the process with exit code ``code`` (``sys.exit(cli.main(...))``, without the interpreter's
    teardown of every module: with torch and dynamo loaded that takes about 0.9 s on a 2-core CPU,
    after the run's files are all closed). What an exit does that matters still happens first: a
    garbage collection (finalizers of what is unreachable), the ``atexit`` callbacks (logging,
    tensorboardX writers, multiprocessing children), stdout and stderr flushed. Under a tracer or a
    profiler (coverage, ``python -m cProfile``), which write their results after the script returns,
    it is a plain ``sys.exit``."""
    if _observed():
        sys.exit(code)
    gc.collect()
    atexit._run_exitfuncs()
    code = _with_late_signal(code)  # a signal during the teardown (answered by main's handlers) counts too
    flush_output()
    os._exit(code)
