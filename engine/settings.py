"""The settings of a run: one typed object with defaults, checked when it is made."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from engine.errors import ConfigError, param

__all__ = ["OPTIMIZERS", "SCHEDULERS", "RunSettings"]

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "step", "cosine", "onecycle", "plateau")
DATA_PATHS = ("auto", "memory", "loader", "torchvision")  # torchvision: the old name of loader


@dataclass
class RunSettings:
    """Everything a run needs besides the model and the data; every field has a default.

    Subclass it (as a dataclass) to add the settings of your own script; they land in
    ``config.json`` and TensorBoard's HParams tab with the rest.

    Groups:
        run folder: ``output_dir`` (default ``runs/<name>-<timestamp>``), ``resume`` (``None``,
            ``"auto"``: the newest valid ``last_*.pt`` there, or a path).
        recipe: ``epochs``, ``batch_size`` (global), ``val_batch_size``, ``optimizer``, ``lr``,
            ``beta1``, ``beta2`` (Adam's and AdamW's moment decays; SGD's momentum is 0.9),
            ``weight_decay``, ``label_smoothing``, ``scheduler``, ``warmup_epochs``.
        data: ``data_dir``, ``download``, ``data_path`` (``"auto"``: tensors on the device, any other
            ``Dataset`` through a ``DataLoader``; ``"memory"``: read into tensors on the device;
            ``"loader"``: a ``DataLoader``; ``"torchvision"`` is the old name of ``"loader"``),
            ``num_workers``, ``limit_train_batches``, ``limit_val_batches`` (validate on the first N
            batches of the validation set: a quick check, not a score to compare), ``epoch_length``
            (batches per epoch of a stream, an ``IterableDataset``; default: one pass).
        what to watch: ``monitor`` (a key of ``trainer.state.metrics``; default ``val_accuracy``
            for classification, ``val_loss`` otherwise) and ``mode`` (``"max"``/``"min"``; default
            ``"min"`` when the name holds ``loss`` or ``error``, else ``"max"``): early stopping,
            best checkpoints and the plateau schedule all follow it.
        handlers: ``val_every`` (epochs), ``val_every_iters`` (iterations instead: a validation, a history row,
            an early-stopping judgement and a best checkpoint every N iterations and after the last),
            ``patience`` (0: off, counts validations), ``min_delta``, ``early_stop_warmup``,
            ``n_saved``, ``save_every_iters``, ``log_every``, ``progress``, ``tensorboard``,
            ``tb_histograms``, ``tb_images_every``.
        engine: ``seed``, ``device``, ``deterministic`` (deterministic kernels on CUDA too: a resumed
            run repeats an uninterrupted one bit for bit there, as on a CPU; costs some speed),
            ``amp`` (``None`` or ``"fp32"``: full precision; ``"auto"``: bf16
            where the hardware computes it natively, else fp32; ``"bf16"``, ``"fp16"``),
            ``accumulation_steps``, ``clip_grad_norm``,
            ``channels_last``, ``compile``, ``threads``, ``stall_timeout`` (seconds without a new batch
            or a finished step before the run ends with exit code 5, naming where; 0: never).
        distributed: ``nproc_per_node`` (spawn that many processes here), ``backend``.
        extras: ``find_lr`` (run the LR finder, write its curve and suggestion, train nothing;
            ``lr="find"``: run it, then train at its suggestion), ``ema`` (validate, early-stop and
            keep as best the exponential moving average of the weights with this decay, e.g. 0.999),
            ``profile`` (time every handler; a table at the end and ``profile.json``).
    """

    output_dir: str | None = None
    resume: str | None = None
    epochs: int = 3
    batch_size: int = 64
    val_batch_size: int = 1000
    optimizer: str = "adam"
    lr: float | str = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    scheduler: str = "none"
    warmup_epochs: float = 0.0
    data_dir: str = "./data"
    download: bool = True
    data_path: str = "auto"
    num_workers: int = 0
    limit_train_batches: int | None = None
    limit_val_batches: int | None = None
    epoch_length: int | None = None
    monitor: str | None = None
    mode: str | None = None
    val_every: int = 1
    val_every_iters: int | None = None
    patience: int = 3
    min_delta: float = 0.0
    early_stop_warmup: int = 0
    n_saved: int = 2
    save_every_iters: int | None = None
    log_every: int = 50
    progress: bool = True
    tensorboard: bool = True
    tb_histograms: bool = False
    tb_images_every: int = 0
    seed: int = 0
    device: str = "auto"
    deterministic: bool = False
    amp: str | None = None
    accumulation_steps: int = 1
    clip_grad_norm: float | None = None
    channels_last: bool = False
    compile: bool = False
    threads: int | None = None
    stall_timeout: float = 600.0
    nproc_per_node: int | None = None
    backend: str | None = None
    find_lr: bool = False
    ema: float | None = None
    profile: bool = False

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> RunSettings:
        """Raise :class:`ConfigError` naming the first field that cannot work."""
        for name in ("epochs", "batch_size", "val_batch_size", "val_every", "n_saved", "accumulation_steps"):
            _positive_int(self, name)
        if self.data_path == "torchvision":
            self.data_path = "loader"
        for name in ("limit_train_batches", "limit_val_batches", "epoch_length", "save_every_iters", "threads",
                     "nproc_per_node", "val_every_iters"):
            if getattr(self, name) is not None:
                _positive_int(self, name)
        for name in ("patience", "early_stop_warmup", "log_every", "tb_images_every", "num_workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{param(name)} must be an integer >= 0, got {value!r}")
        if self.lr != "find":
            _positive_float(self, "lr")
        if self.ema is not None and (not isinstance(self.ema, (int, float)) or isinstance(self.ema, bool)
                                     or not 0 < self.ema < 1):
            raise ConfigError(f"{param('ema')} is the EMA decay, a number between 0 and 1 (e.g. 0.999), "
                              f"got {self.ema!r}")
        if self.clip_grad_norm is not None:
            _positive_float(self, "clip_grad_norm")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
                raise ConfigError(f"{param(name)} is a moment decay of Adam, a number in [0, 1) (e.g. 0.9), "
                                  f"got {value!r}")
        for name in ("weight_decay", "label_smoothing", "min_delta", "warmup_epochs", "stall_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{param(name)} must be a finite number >= 0, got {value!r}")
        for name, allowed in (("optimizer", OPTIMIZERS), ("scheduler", SCHEDULERS), ("data_path", DATA_PATHS),
                              ("amp", (None, "fp32", "auto", "bf16", "fp16")), ("backend", (None, "gloo", "nccl")),
                              ("mode", (None, "min", "max"))):  # fmt: skip
            if getattr(self, name) not in allowed:
                shown = ", ".join(str(a) for a in allowed)
                raise ConfigError(f"{param(name)} must be one of {shown}; got {getattr(self, name)!r}")
        _one_cadence(self)
        if self.warmup_epochs >= self.epochs:
            raise ConfigError(f"{param('warmup_epochs')} ({self.warmup_epochs:g}) must be less than "
                              f"{param('epochs')} ({self.epochs})")
        if self.monitor is not None and (not isinstance(self.monitor, str) or not self.monitor):
            raise ConfigError(f"{param('monitor')} must be the name of a metric, got {self.monitor!r}")
        return self

    def watched(self, classification: bool = True) -> tuple[str, str]:
        """``(monitor, mode)`` with the defaults filled in (see the class docstring)."""
        monitor = self.monitor or ("val_accuracy" if classification else "val_loss")
        mode = self.mode or ("min" if ("loss" in monitor or "error" in monitor) else "max")
        return monitor, mode

    def to_dict(self) -> dict[str, Any]:
        """Every field, for ``config.json``."""
        return dataclasses.asdict(self)


def _one_cadence(settings: RunSettings) -> None:
    """Validation every N epochs or every N iterations, not both."""
    if settings.val_every_iters is not None and settings.val_every != 1:
        raise ConfigError(f"{param('val_every')} counts epochs and {param('val_every_iters')} iterations: give one")


def _positive_int(settings: RunSettings, name: str) -> None:
    value = getattr(settings, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{param(name)} must be a positive integer, got {value!r}")


def _positive_float(settings: RunSettings, name: str) -> None:
    value = getattr(settings, name)
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{param(name)} must be a positive number, got {value!r}")
