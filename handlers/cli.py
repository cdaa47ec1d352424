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
import copy
import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from engine.errors import EXIT_USAGE, flag_names
from engine.settings import OPTIMIZERS, SCHEDULERS, RunSettings
from handlers.config_file import load_config, settings_in_config
from handlers.console import quiet_ignite
from handlers.exits import exit_process, guarded, remember_signals, with_late_signal
from handlers.launch import PerProcess, launch
from handlers.signals import LastLines
from handlers.user_errors import FULL_TRACEBACK_ENV

__all__ = ["OneLineParser", "add_run_arguments", "exit_process", "launch", "main", "run_parser", "settings_from_args"]

S = TypeVar("S", bound=RunSettings)


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Argparse's defaults in ``--help``, but not ``(default: None)`` (a flag not given: the preset or the
    settings decide) and not a second default after a help text that already says its own."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or "(default:" in text:
            return text
        return super()._get_help_string(action)


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
    _data_flags(parser, d, data_env)
    _recipe_flags(parser, d)
    _handler_flags(parser, d)
    _engine_flags(parser, d)
    _extra_flags(parser, d)
    _distributed_flags(parser, d)
    return parser


def _data_flags(p: argparse.ArgumentParser, d: RunSettings, data_env: str | None) -> None:
    """Where the data and the run folder are, and what to resume or replay."""
    p.add_argument("--data-dir", default=(os.environ.get(data_env) if data_env else None) or d.data_dir,
                   help=f"data folder (default: ${data_env}, else {d.data_dir})" if data_env else "data folder")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                   help="download the data when it is missing (default: on; --no-download: never)")
    p.add_argument("--output-dir", default=None, help="run folder (default: runs/<name>-<timestamp>)")
    p.add_argument("--resume", default=None, help="'auto' (newest valid last_*.pt in --output-dir) or a path")
    p.add_argument("--config", default=None, metavar="PATH",
                   help="every setting from a run's config.json (or a TOML file with its keys); flags given override")


def _recipe_flags(p: argparse.ArgumentParser, d: RunSettings) -> None:
    """The recipe: optimizer, schedule, batch sizes, data path (``None``: the preset or the settings class decides)."""
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


def _handler_flags(p: argparse.ArgumentParser, d: RunSettings) -> None:
    """The default handlers: what they watch and how often they act."""
    g = p.add_argument_group("handlers")
    g.add_argument("--monitor", default=d.monitor,
                   help="metric that early stopping, best checkpoints and plateau LR follow (default: val_accuracy, "
                        "val_loss without accuracy)")
    g.add_argument("--mode", choices=["max", "min"], default=d.mode,
                   help="direction of --monitor (default: min for a loss or error, else max)")
    g.add_argument("--val-every", type=positive_int, default=d.val_every,
                   help="validate every N epochs (and after the last)")
    g.add_argument("--val-every-iters", type=positive_int, default=d.val_every_iters, metavar="N",
                   help="validate every N iterations instead (and after the last): history rows, early stopping, "
                        "best checkpoints and the plateau LR follow each validation")
    g.add_argument("--patience", type=non_negative_int, default=d.patience, help="early stopping; 0 switches it off")
    g.add_argument("--min-delta", type=non_negative_float, default=d.min_delta)
    g.add_argument("--early-stop-warmup", type=non_negative_int, default=d.early_stop_warmup,
                   help="epochs never judged")
    g.add_argument("--n-saved", type=positive_int, default=d.n_saved, help="best checkpoints kept")
    g.add_argument("--save-every-iters", type=positive_int, default=d.save_every_iters,
                   help="also save last_*.pt every N iterations (mid-epoch, exact resume)")
    g.add_argument("--log-every", type=non_negative_int, default=d.log_every,
                   help="batch lines every N batches (0: none)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                   help="progress bars (default: on; always off when not a terminal)")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                   help="TensorBoard event files (default: on)")
    g.add_argument("--tb-histograms", action="store_true", help="weight and gradient histograms (cost time)")
    g.add_argument("--tb-images-every", type=non_negative_int, default=d.tb_images_every,
                   help="confusion matrix and misclassified samples every N epochs (0: after the last only)")


def _engine_flags(p: argparse.ArgumentParser, d: RunSettings) -> None:
    """The engine: device, precision, workers, limits, compile."""
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
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the model (what it compiled is kept for the next run: in the cache folder, and "
                        "beside the checkpoints)")
    g.add_argument("--threads", type=positive_int, default=d.threads, help="torch CPU threads")
    g.add_argument("--stall-timeout", type=non_negative_float, default=d.stall_timeout, metavar="SECONDS",
                   help="end the run (exit code 5), naming where, when no batch arrives or a step does not return "
                        "for this long; 0: never")


def _extra_flags(p: argparse.ArgumentParser, d: RunSettings) -> None:
    """Extras: LR finder, weight average, profile, tracebacks."""
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


def _distributed_flags(p: argparse.ArgumentParser, d: RunSettings) -> None:
    """Distributed: processes spawned here and the backend."""
    g = p.add_argument_group("distributed (or launch with torchrun)")
    g.add_argument("--nproc-per-node", type=positive_int, default=None,
                   help="spawn this many processes here (as torchrun would); --batch-size stays global")
    g.add_argument("--backend", choices=["gloo", "nccl"], default=None, help="default: nccl with CUDA, else gloo")


def run_parser(description: str, defaults: RunSettings | None = None, data_env: str | None = None) -> OneLineParser:
    """A :class:`OneLineParser` with every run flag (see :func:`add_run_arguments`)."""
    parser = OneLineParser(description=description, formatter_class=DefaultsFormatter)
    return add_run_arguments(parser, defaults, data_env)


def flag_map(parser: argparse.ArgumentParser, defaults: RunSettings | None = None) -> dict[str, str]:
    """Setting name -> the flag that sets it, for messages (``warmup_epochs`` -> ``--warmup-epochs``); of an
    on/off pair, the one that changes the setting's default (``download`` -> ``--no-download``)."""
    d = defaults or RunSettings()
    flags = {}
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        negated = isinstance(action, argparse.BooleanOptionalAction) and getattr(d, action.dest, None) is True
        flags[action.dest] = action.option_strings[1 if negated else 0]
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
    remember_signals(last)
    with flag_names(flags):
        args = parser.parse_args(argv)
        if getattr(args, "full_traceback", False):
            os.environ[FULL_TRACEBACK_ENV] = "1"  # spawned processes inherit it
        explicit = given_on_command_line(parser, argv) if getattr(args, "config", None) else None
        code = guarded(lambda: launch(per_process, settings_from_args(args, settings_cls, presets, explicit), flags))
    return with_late_signal(code)


