"""``attach_run``: every default handler on your trainer and evaluator, the run folder taken, the resume;
one call, for engines built by :func:`handlers.fit.build_run` or by yourself.

    run = attach_run(trainer, evaluator, train_loader=..., val_loader=...,
                     to_save={"model": model, "optimizer": optimizer}, settings=RunSettings(...))
    result = run.run()          # trainer.run to settings.epochs, then history, summary, exit code

The engines stay plain Ignite engines: attach your own handlers before or after, or replace ours
(they are attributes of the returned :class:`~handlers.run.Run`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine

from engine.device import RunDevice
from engine.distributed import PerRank
from engine.errors import ConfigError, param
from engine.files import write_json_atomic
from engine.run_lock import RunLock
from engine.settings import RunSettings
from handlers.checkpoint import TrainingCheckpoint, load_checkpoint
from handlers.checkpoint.compatible import check_resumable
from handlers.checkpoint.resume import data_order, resume, resume_point
from handlers.console import ConsoleLogger, quiet_ignite, write_line
from handlers.early_stopping import EarlyStopping
from handlers.history import History
from handlers.loaders import data_route_of
from handlers.lr_schedule import LRSchedule
from handlers.metrics import AccuracyView, TrainMetrics
from handlers.model_summary import ModelSummary, summary_line
from handlers.nan_guard import NanGuard
from handlers.ordering import run_period
from handlers.profile import Profile
from handlers.progress import Progress, progress_wanted
from handlers.rng import RNGState
from handlers.run import Run
from handlers.run_folder import check_output_dir, clear_failed_start, failed_start, make_output_dir, saved_config
from handlers.signals import GracefulStop
from handlers.tensorboard import MisclassifiedCollector, TensorBoardLogging
from handlers.validation import Validation
from handlers.watchdog import StallWatchdog

__all__ = ["attach_run"]


def _attach_user_handler(handler: Any, trainer: Engine, evaluator: Engine) -> None:
    """``handler.attach(trainer, evaluator)`` if it takes both, else ``handler.attach(trainer)``."""
    attach = getattr(handler, "attach", None)
    if not callable(attach):
        raise TypeError(f"a handler needs an attach method; {type(handler).__name__} has none")
    try:
        takes_two = len(inspect.signature(attach).parameters) >= 2
    except (TypeError, ValueError):
        takes_two = False
    attach(trainer, evaluator) if takes_two else attach(trainer)


def attach_run(
    trainer: Engine,
    evaluator: Engine,
    *,
    train_loader: Iterable,
    val_loader: Iterable,
    to_save: Mapping[str, Any],
    settings: RunSettings,
    classification: bool = True,
    handlers: Sequence[Any] = (),
    denormalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    name: str = "run",
    extra_config: Mapping[str, Any] | None = None,
    train_loss_fn: Callable | None = None,
    accuracy_view: AccuracyView | None = None,
    device: RunDevice | None = None,
) -> Run:
    """Attach every default handler to ``trainer`` and ``evaluator``, then resume if asked; one call.

    Attached (each runs at its :class:`~handlers.ordering.Stage` at an epoch end): train metrics,
    validation every ``settings.val_every`` epochs, the LR schedule, the history, early stopping,
    the NaN guard, best/last checkpoints (also every ``save_every_iters``), stop signals, console
    lines, progress bars and TensorBoard (rank 0), then your ``handlers`` (``attach(trainer,
    evaluator)`` or ``attach(trainer)``; those with ``state_dict`` are saved in every checkpoint).

    Args:
        trainer: from :func:`engine.create_trainer` (or your own engine with the same output).
        evaluator: from :func:`engine.create_evaluator` (or your own engine with the same output).
        train_loader: what the trainer iterates; its data order (an ``InMemoryLoader`` or a
            ``ResumableRandomSampler``) is saved and restored exactly.
        val_loader: what the evaluator iterates.
        to_save: at least ``"model"`` and ``"optimizer"``; anything else with ``state_dict``.
        settings: see :class:`engine.RunSettings`; ``settings.output_dir`` and ``settings.resume``
            (``"auto"`` or a path) say where and whether to continue.
        classification: accuracy, confusion matrix and misclassified images; else loss only.
        denormalize: maps normalised inputs back to [0, 1] for TensorBoard images.
        name: default folder name, ``runs/<name>-<timestamp>``.
        extra_config: more entries for ``config.json`` (the device, ...).
        train_loss_fn: ``train_loss`` as this function of the step's logits and targets, not the
            step's own loss (``fit``: the plain cross-entropy when the training loss smooths labels).
        accuracy_view: how the accuracies and the confusion matrix read outputs and targets
            (:class:`~handlers.metrics.AccuracyView`: labels, soft labels, per-label binary).
        device: the run's :class:`~engine.device.RunDevice` (default: ``settings.device`` resolved),
            where the metrics' sums are kept and whose random generator checkpoints hold.
    """
    settings.check()
    view = accuracy_view or AccuracyView()
    quiet_ignite()  # before Ignite's handlers are built: they set up their loggers then
    for key in ("model", "optimizer"):
        if key not in to_save:
            raise ValueError(f"to_save must hold {key!r}")
    out, given = _folder_and_resume_file(settings, name)
    run = Run(trainer, evaluator, train_loader, settings, out, classification, device, val_loader)
    point = _resume_point(run, given)  # checked against the saved settings before the folder is touched
    _take_folder(run)
    try:
        _attach_handlers(run, to_save, val_loader, handlers, train_loss_fn, view)
        run.resumed_from = resume(run.checkpoint, run.to_save, trainer, point,
                                  exact_on_device=not run.device.is_cuda or settings.deterministic)
        _write_config(run, extra_config)
        _attach_records(run, to_save["model"], view, denormalize)
    except BaseException:
        run.close()
        raise
    return run


def _folder_and_resume_file(settings: RunSettings, name: str) -> tuple[Path, tuple[Path, dict] | None]:
    """The run folder (checked on rank 0) and the checkpoint a path ``--resume`` names, loaded: a bad file
    fails here, before any work."""
    if idist.get_world_size() > 1 and not settings.output_dir:
        raise ConfigError(f"a distributed run needs an explicit {param('output_dir')} (every process must agree on it)")
    rank = idist.get_rank()
    out = check_output_dir(settings.output_dir, settings.resume, name) if rank == 0 else Path(settings.output_dir)
    if settings.resume in (None, "auto"):
        return out, None
    path = Path(settings.resume)
    return out, (path, load_checkpoint(path, log=write_line))


def _resume_point(run: Run, given: tuple[Path, dict] | None) -> tuple[Path, dict] | None:
    """The checkpoint to continue from (:func:`~handlers.checkpoint.resume.resume_point`), refused in one
    line if the settings or the data changed what its position means; other changed settings said."""
    point = resume_point(run.output_dir / "checkpoints", run.settings.resume, given)
    if point is None:
        return None
    resolved = {"monitor": run.monitor, "mode": run.mode, "device": str(run.device.device),
                "data_route": data_route_of(run.train_loader)}
    changed = check_resumable(saved_config(run.output_dir), run.settings, point, _loader_length(run.train_loader),
                              resolved)
    if changed:
        write_line(f"Resuming with settings changed since the checkpoint: {', '.join(changed)} (from here on; "
                   f"recorded in config.json)")
    return point


def _loader_length(loader: Iterable) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:  # a stream of unknown length
        return None


def _take_folder(run: Run) -> None:
    """Rank 0 makes the folder and locks it first (a run still starting there is never mistaken for a dead
    one), then clears what a run that died before its first checkpoint left."""
    if idist.get_rank() != 0:
        return
    make_output_dir(run.output_dir)
    run.lock = RunLock(run.output_dir).acquire()
    if run.settings.resume is None and failed_start(run.output_dir):
        clear_failed_start(run.output_dir)


def _write_config(run: Run, extra_config: Mapping[str, Any] | None) -> None:
    """``config.json``: the settings, what the caller adds, and the run's own records."""
    run.config = {**run.settings.to_dict(), **(extra_config or {}), "output_dir": str(run.output_dir),
                  "world_size": idist.get_world_size(), "monitor": run.monitor, "mode": run.mode,
                  "data_route": data_route_of(run.train_loader)}
    if run.resumed_from is not None:
        run.config["resumed_from"] = str(run.resumed_from)
    if idist.get_rank() == 0:
        write_json_atomic(run.output_dir / "config.json", run.config)


def _attach_records(run: Run, model: Any, view: AccuracyView, denormalize: Callable | None) -> None:
    """TensorBoard (rank 0, after the resume: it purges what a killed run logged after its checkpoint), the
    profile and the model summary. Every rank collects misclassified samples (the counts are summed over ranks)."""
    s, trainer, rank = run.settings, run.trainer, idist.get_rank()
    collector = (MisclassifiedCollector(view=view).attach(run.evaluator)
                 if s.tensorboard and run.classification and not view.per_label else None)
    if s.tensorboard and rank == 0:
        iteration = trainer.state.iteration
        run.tensorboard = TensorBoardLogging(
            run.output_dir / "tb", log_every=s.log_every, lr=_lr_used(run), collector=collector,
            model=model, histograms=s.tb_histograms, purge_step=iteration + 1 if iteration else None,
            denormalize=denormalize, history=run.history, images_every=s.tb_images_every,
        ).attach(trainer)
        run.checkpoint.before_save.append(run.tensorboard.before_checkpoint)  # nothing logged is lost on a kill
    if s.profile:
        run.profile = Profile().attach(trainer, run.evaluator)
    ModelSummary(model, on_summary=lambda info: _record_summary(run, info),
                 log=write_line if rank == 0 else lambda _: None).attach(trainer)


def _record_summary(run: Run, info: dict[str, Any]) -> None:
    """The model summary into config.json and TensorBoard's text tab (rank 0)."""
    run.config["model_summary"] = info
    if idist.get_rank() == 0:
        write_json_atomic(run.output_dir / "config.json", run.config)
        if run.tensorboard is not None:
            run.tensorboard.writer.add_text("model", summary_line(info), run.trainer.state.iteration)


def _attach_handlers(run: Run, to_save: Mapping[str, Any], val_loader: Iterable, handlers: Sequence[Any],
                     train_loss_fn: Callable | None = None, accuracy_view: AccuracyView | None = None) -> None:
    s, trainer, evaluator = run.settings, run.trainer, run.evaluator
    run_period(trainer, s.val_every_iters)  # (fit decided it already)
    # the groups' ends are fixed by the data alone, never by --log-every or a progress bar: the same sums, to the bit
    run.train_metrics = TrainMetrics(accuracy=run.classification, loss_fn=train_loss_fn, accuracy_view=accuracy_view,
                                     device=run.device.device).attach(trainer)
    Validation(evaluator, val_loader, every=s.val_every, watched={"monitor": run.monitor}).attach(trainer)
    run.lr_schedule = LRSchedule(s.scheduler, to_save["optimizer"], epochs=s.epochs, epoch_length=_epoch_length(run),
                                 warmup_epochs=s.warmup_epochs, metric=run.monitor, mode=run.mode).attach(trainer)
    run.history = History(run.output_dir / "history.json", extra={"lr": _lr_used(run)}).attach(trainer)
    run.early_stopping = EarlyStopping(patience=s.patience, min_delta=s.min_delta, warmup=s.early_stop_warmup,
                                       metric=run.monitor, mode=run.mode, log=write_line).attach(trainer)
    # on a GPU the loss is read at the console's cadence, not every iteration (each read waits for the step)
    read_every = (s.log_every or 50) if run.device.defer_reads else None
    run.nan_guard = NanGuard(log=write_line, check_every=read_every or 1, data=run.train_loader).attach(trainer)
    run.to_save = {**to_save, "trainer": trainer, "lr_schedule": run.lr_schedule, "early_stopping": run.early_stopping,
                   "history": run.history, "train_metrics": run.train_metrics,
                   # Ignite's metrics keep their sums per rank themselves
                   "rng": PerRank(RNGState(run.device.generator_device), "RNG state")}
    order = data_order(run.train_loader, trainer)
    if order is not None:
        run.to_save["data"] = PerRank(order, "data position")
    scaler = getattr(trainer, "scaler", None)
    if scaler is not None:
        run.to_save["scaler"] = scaler
    for index, handler in enumerate(handlers):
        _attach_user_handler(handler, trainer, evaluator)
        if hasattr(handler, "state_dict") and hasattr(handler, "load_state_dict"):
            run.to_save[f"handler{index}_{type(handler).__name__}"] = handler
    run.checkpoint = TrainingCheckpoint(run.output_dir / "checkpoints", run.to_save, metric=run.monitor, mode=run.mode,
                                        n_saved=s.n_saved, every_iters=s.save_every_iters,
                                        skip_if=lambda: run.nan_guard.triggered).attach(trainer)
    run.stop = GracefulStop(run.checkpoint, log=write_line).attach(trainer)
    run.watchdog = StallWatchdog(s.stall_timeout, kept=lambda: run.checkpoint.last_path).attach(trainer, evaluator)
    ConsoleLogger(run.train_metrics, log_every=s.log_every).attach(trainer)
    if progress_wanted(not s.progress):
        Progress(loss_every=read_every).attach(trainer, evaluator)


def _lr_used(run: Run) -> Callable[[], float]:
    """The learning rate the latest step used (our trainer records it before the step, whoever schedules it);
    for an engine of your own, the optimizer's now."""
    step = getattr(run.trainer, "train_step", None)
    if step is not None and hasattr(step, "lr"):
        return lambda: float(step.lr)
    return lambda: run.lr_schedule.lr


def _epoch_length(run: Run) -> int | None:
    """Batches per epoch; ``None`` for a stream of unknown length (then no schedule defined over the run)."""
    length = _loader_length(run.train_loader)
    if length is None and (run.settings.scheduler not in ("none", "plateau") or run.settings.warmup_epochs):
        raise ConfigError(f"{param('scheduler')} {run.settings.scheduler} (and {param('warmup_epochs')}) needs "
                          f"the length of an epoch, which a stream does not tell: set {param('epoch_length')} "
                          f"(batches per epoch), or use {param('scheduler')} none or plateau")
    return length
