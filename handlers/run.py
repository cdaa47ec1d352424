"""The run: every default handler on your trainer and evaluator, the resume, and the end of the run.

    run = attach_run(trainer, evaluator, train_loader=..., val_loader=...,
                     to_save={"model": model, "optimizer": optimizer}, settings=RunSettings(...))
    result = run.run()          # trainer.run to settings.epochs, then history, summary, exit code

The engines stay plain Ignite engines: attach your own handlers before or after, or replace ours
(they are attributes of the returned :class:`Run`).
"""

from __future__ import annotations

import errno
import inspect
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from engine.checks import BatchError
from engine.determinism import deterministic_algorithms, nondeterministic_op
from engine.device import RunDevice
from engine.distributed import PerRank
from engine.epoch import batch_in_epoch, mid_epoch
from engine.errors import EXIT_NAN, EXIT_OK, ConfigError, param
from engine.run_lock import RunLock
from engine.settings import RunSettings
from handlers.adapters import release_workers
from handlers.checkpoint import TrainingCheckpoint, find_resume_checkpoint, load_checkpoint, restore
from handlers.console import ConsoleLogger, quiet_ignite, write_line
from handlers.early_stopping import EarlyStopping
from handlers.history import History, write_json_atomic
from handlers.lr_schedule import LRSchedule
from handlers.metrics import AccuracyView, TrainMetrics
from handlers.model_summary import ModelSummary, summary_line
from handlers.nan_guard import NanGuard
from handlers.profile import Profile
from handlers.progress import Progress, progress_wanted
from handlers.rng import RNGState
from handlers.signals import GracefulStop
from handlers.tensorboard import MisclassifiedCollector, TensorBoardLogging
from handlers.validation import Validation

__all__ = ["Run", "RunResult", "attach_run", "check_output_dir", "data_order", "make_output_dir"]


def _process_start() -> float:
    """The ``time.perf_counter()`` reading at this process's start (Linux: from ``/proc``, so that the
    summary line counts the imports too), else at this module's import."""
    try:
        with open("/proc/self/stat") as stat, open("/proc/uptime") as uptime:
            started_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
            up = float(uptime.read().split()[0])
        return time.perf_counter() - max(0.0, up - started_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.perf_counter()


_IMPORTED = _process_start()  # the summary line counts from here


@dataclass
class RunResult:
    """What a run leaves: its per-epoch history, the best epoch's row, the files, and the exit code
    (0; 3 after a non-finite loss; 128 + signal after a stop signal)."""

    exit_code: int
    output_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    best_path: Path | None = None
    last_path: Path | None = None


def check_output_dir(output_dir: str | Path | None, resume: str | None, name: str = "run") -> Path:
    """The run folder (default ``runs/<name>-<timestamp>``); an existing run there is never
    overwritten unless resumed."""
    out = Path(output_dir or f"runs/{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        if out.exists() and not out.is_dir():
            raise ConfigError(f"{param('output_dir')} {out} is a file, not a folder")
        holds_files = out.exists() and any(out.iterdir())
    except OSError as exc:
        raise ConfigError(f"{param('output_dir')} {out} cannot be read: {_why_not(out, exc)}; choose another "
                          f"{param('output_dir')}") from None
    if resume is None and holds_files and not failed_start(out):
        raise ConfigError(f"output dir {out} already holds a run: pass {param('resume', 'auto')} to continue it, "
                          f"or choose another {param('output_dir')}")
    return out


def make_output_dir(out: Path) -> None:
    """Make the run folder and check that it can be written (a file made and removed), before anything
    else: a failure is one line naming the setting (a :class:`ConfigError`, exit 2), not an error
    of the run's first write."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{param('output_dir')} {out} cannot be made or written: {_why_not(out, exc)}; choose "
                          f"another {param('output_dir')}") from None


def _why_not(out: Path, exc: OSError) -> str:
    if exc.errno == errno.ENOTDIR:
        blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
        return f"{blocking} is a file, not a folder" if blocking is not None else "a part of it is not a folder"
    if exc.errno in (errno.EACCES, errno.EPERM):
        where = str(exc.filename or out)
        return "permission denied" if where == str(out) else f"permission denied on {where}"
    if exc.errno == errno.EROFS:
        return "its file system is read-only"
    if exc.errno == errno.ENOSPC:
        return "no space is left on its disk"
    return exc.strerror or str(exc)


def failed_start(out: Path) -> bool:
    """Whether ``out`` holds a run of ours that ended before its first checkpoint (its ``config.json``
    and no ``checkpoints/*.pt``): nothing there to continue, so the same command may start afresh in it."""
    started = (out / "config.json").is_file() or (out / "lr_finder.json").is_file()
    return started and not any((out / "checkpoints").glob("*.pt"))


def _clear_failed_start(out: Path) -> None:
    """Remove what a run that died before its first save left (config, history, TensorBoard events,
    half-written files), so that the new run's records are not mixed with them; say so in one line."""
    stale = [out / "config.json", out / "history.json", *(out / "tb").glob("events.out.tfevents.*"),
             *(out / "checkpoints").glob(".tmp-*")]  # fmt: skip
    for path in stale:
        path.unlink(missing_ok=True)
    write_line(f"{out} holds no checkpoint (the run there ended before its first save): starting afresh in it")


def data_order(train_loader: Iterable, trainer: Engine | None) -> Any | None:
    """The object that holds the training data's order (an ``InMemoryLoader``, a ``StreamLoader``, or the
    loader's ``ResumableRandomSampler``, then attached to ``trainer`` if given); ``None`` if there is none."""
    if hasattr(train_loader, "state_dict") and hasattr(train_loader, "load_state_dict"):
        return train_loader
    sampler = getattr(train_loader, "sampler", None)
    if hasattr(sampler, "state_dict") and hasattr(sampler, "load_state_dict"):
        if trainer is not None and hasattr(sampler, "attach"):
            sampler.attach(trainer, getattr(train_loader, "batch_size", None) or 1)
        return sampler
    return None


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


class Run:
    """Every default handler of a run, attached; built by :func:`attach_run`."""

    def __init__(self, trainer: Engine, evaluator: Engine, train_loader: Iterable, settings: RunSettings,
                 output_dir: Path, classification: bool, device: RunDevice | None = None) -> None:  # fmt: skip
        self.trainer, self.evaluator, self.train_loader = trainer, evaluator, train_loader
        self.device = device or RunDevice.of(settings.device)
        self.settings, self.output_dir, self.classification = settings, output_dir, classification
        self.monitor, self.mode = settings.watched(classification)
        self.started = _IMPORTED
        self.lock: RunLock | None = None
        self.stop: GracefulStop | None = None  # set with the other handlers by attach_run
        self.tensorboard: TensorBoardLogging | None = None
        self.resumed_from: Path | None = None
        self.val_loader: Iterable | None = None  # set by attach_run
        self.explain: Callable[[Any, str], str | None] | None = None  # (batch, set name) -> what is wrong
        self.profile: Profile | None = None
        self.config: dict[str, Any] = {}

    @property
    def done(self) -> bool:
        """Whether the trainer has already run every epoch (a finished run being resumed)."""
        return self.trainer.state.epoch >= self.settings.epochs and not mid_epoch(self.trainer.state)

    def run(self) -> RunResult:
        """``trainer.run`` up to ``settings.epochs`` (or until a handler stops it), then :meth:`finish`.

        An exception ends the run with the folder released; it carries ``run_where`` (``"epoch E,
        iteration I"``, and the validation batch if it was validating). When ``explain`` finds the
        failing batch at fault (targets that do not fit the model, say), a one-line
        :class:`ConfigError` is raised from it instead."""
        try:
            if not self.done:
                with deterministic_algorithms(self.settings.deterministic):
                    self.trainer.run(self.train_loader, max_epochs=self.settings.epochs)
        except Exception as exc:
            self.close()
            if isinstance(exc, BatchError):  # found on the host before the batch reached the device
                raise ConfigError(f"{exc} (found at {self._where()})") from exc
            no_kernel = nondeterministic_op(exc)
            if no_kernel is not None:
                raise no_kernel from exc
            name, batch = self._failing_batch()
            message = None
            if self.explain is not None and batch is not None and not isinstance(exc, ConfigError):
                try:
                    message = self.explain(batch, name)
                except Exception:  # the explanation must never hide the error itself
                    message = None
            if message:
                raise ConfigError(f"{message} (found at {self._where()})") from exc
            try:
                exc.run_where = self._where()  # type: ignore[attr-defined]
            except AttributeError:
                pass
            raise
        except BaseException:
            self.close()
            raise
        return self.finish()

    def _validating(self) -> bool:
        return self.trainer.last_event_name == Events.EPOCH_COMPLETED and self.evaluator.state.batch is not None \
            and self.evaluator.last_event_name != Events.COMPLETED

    def _failing_batch(self) -> tuple[str, Any]:
        if self._validating():
            return "validation", self.evaluator.state.batch
        return "training", self.trainer.state.batch

    def _where(self) -> str:
        state = self.trainer.state
        where = f"epoch {state.epoch}, iteration {state.iteration}"
        if self._validating():
            where += f", validation batch {self.evaluator.state.iteration}"
        return where

    def finish(self) -> RunResult:
        """Write the last records, print the summary, release the run folder; the result. The run's
        signal handlers stay until its last line: a signal meanwhile is answered, and counted in the
        exit code, without cutting anything short."""
        try:
            self.history.write()
            best = self.history.best(self.monitor, self.mode)
            if self.tensorboard is not None:
                final = self.history.epochs[-1].get(self.monitor) if self.history.epochs else None
                self.tensorboard.log_hparams(self.config, {f"hparam/best_{self.monitor}": best and best[self.monitor],
                                                           "hparam/best_epoch": best and best["epoch"],
                                                           f"hparam/final_{self.monitor}": final})
        finally:
            self.close(signals=False)
        try:
            self._summary(best)
            code = self.stop.exit_code if self.stop is not None else None
            if code is None:
                code = EXIT_NAN if self.nan_guard.triggered else EXIT_OK
            checkpoint = self.checkpoint
            return RunResult(code, self.output_dir, [dict(r) for r in self.history.epochs], best,
                             checkpoint.best_path, checkpoint.last_path)
        finally:
            if self.stop is not None:
                self.stop.uninstall()

    def _summary(self, best: dict[str, Any] | None) -> None:
        out, checkpoint = self.output_dir, self.checkpoint
        if best is not None:
            write_line(f"Best {self.monitor.replace('_', ' ')}: {_shown(self.monitor, best[self.monitor])} at epoch "
                       f"{best['epoch']} ({len(self.history.epochs)} epoch(s) in all, this process "
                       f"{time.perf_counter() - self.started:.1f} s)")
        write_line(f"Checkpoints: {out / 'checkpoints'} (best: {checkpoint.best_path and checkpoint.best_path.name}, "
                   f"last: {checkpoint.last_path and checkpoint.last_path.name})")
        write_line(f"History: {out / 'history.json'}")
        if self.profile is not None and idist.get_rank() == 0:
            for line in self.profile.table():
                write_line(line)
            self.profile.write(out / "profile.json")
            write_line(f"Profile: {out / 'profile.json'}")
        if self.tensorboard is not None:
            write_line(f"TensorBoard: tensorboard --logdir {out / 'tb'}")

    def close(self, signals: bool = True) -> None:
        """Put the signal handlers back (unless ``signals`` is false: the summary is still to come), close
        TensorBoard, release the run folder (idempotent)."""
        if signals and self.stop is not None:
            self.stop.uninstall()
        if self.tensorboard is not None:
            self.tensorboard.close()
        for loader in (self.train_loader, self.val_loader):
            release_workers(loader)
        if self.lock is not None:
            self.lock.release()


def _shown(metric: str, value: float) -> str:
    return f"{value * 100:.2f}%" if metric.endswith("accuracy") else f"{value:.4f}"


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
        trainer, evaluator: from :func:`engine.create_trainer` / :func:`engine.create_evaluator`
            (or your own engines with the same outputs).
        train_loader, val_loader: what the engines iterate; the training data order (an
            ``InMemoryLoader`` or a ``ResumableRandomSampler``) is saved and restored exactly.
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
    rank, world = idist.get_rank(), idist.get_world_size()
    if world > 1 and not settings.output_dir:
        raise ConfigError(f"a distributed run needs an explicit {param('output_dir')} (every process must agree on it)")
    out = check_output_dir(settings.output_dir, settings.resume, name) if rank == 0 else Path(settings.output_dir)
    resume_state = None
    if settings.resume not in (None, "auto"):
        path = Path(settings.resume)
        resume_state = (path, load_checkpoint(path, log=write_line))  # a bad file fails here, before any work
    run = Run(trainer, evaluator, train_loader, settings, out, classification, device)
    run.val_loader = val_loader
    if rank == 0:
        make_output_dir(out)
        run.lock = RunLock(out).acquire()  # first: a run still starting there is never mistaken for a dead one
        if settings.resume is None and failed_start(out):
            _clear_failed_start(out)
    try:
        _attach_handlers(run, to_save, val_loader, handlers, train_loss_fn, view)
        _resume(run, resume_state)
        run.config = {**settings.to_dict(), **(extra_config or {}), "output_dir": str(out), "world_size": world,
                      "monitor": run.monitor, "mode": run.mode}
        if run.resumed_from is not None:
            run.config["resumed_from"] = str(run.resumed_from)
        if rank == 0:
            write_json_atomic(out / "config.json", run.config)
        # every rank collects (the counts are summed over ranks); rank 0 writes, after the resume,
        # purging what a killed run logged after its checkpoint
        collector = (MisclassifiedCollector(view=view).attach(evaluator)
                     if settings.tensorboard and classification and not view.per_label else None)
        if settings.tensorboard and rank == 0:
            iteration = trainer.state.iteration
            run.tensorboard = TensorBoardLogging(
                out / "tb", log_every=settings.log_every, lr=lambda: run.lr_schedule.lr, collector=collector,
                model=to_save["model"], histograms=settings.tb_histograms,
                purge_step=iteration + 1 if iteration else None,
                denormalize=denormalize, history=run.history, images_every=settings.tb_images_every,
            ).attach(trainer)
        if settings.profile:
            run.profile = Profile().attach(trainer, evaluator)
        ModelSummary(to_save["model"], on_summary=lambda info: _record_summary(run, info),
                     log=write_line if rank == 0 else lambda _: None).attach(trainer)
    except BaseException:
        run.close()
        raise
    return run


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
    # the groups' ends are fixed by the data alone, never by --log-every or a progress bar: the same sums, to the bit
    run.train_metrics = TrainMetrics(accuracy=run.classification, loss_fn=train_loss_fn, accuracy_view=accuracy_view,
                                     device=run.device.device).attach(trainer)
    Validation(evaluator, val_loader, every=s.val_every, watched={"monitor": run.monitor}).attach(trainer)
    run.lr_schedule = LRSchedule(s.scheduler, to_save["optimizer"], epochs=s.epochs, epoch_length=_epoch_length(run),
                                 warmup_epochs=s.warmup_epochs, metric=run.monitor, mode=run.mode).attach(trainer)
    run.history = History(run.output_dir / "history.json", extra={"lr": lambda: run.lr_schedule.lr}).attach(trainer)
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
    ConsoleLogger(run.train_metrics, log_every=s.log_every).attach(trainer)
    if progress_wanted(not s.progress):
        Progress(loss_every=read_every).attach(trainer, evaluator)


def _epoch_length(run: Run) -> int | None:
    """Batches per epoch; ``None`` for a stream of unknown length (then no schedule defined over the run)."""
    try:
        return len(run.train_loader)  # type: ignore[arg-type]
    except TypeError:
        if run.settings.scheduler not in ("none", "plateau") or run.settings.warmup_epochs:
            raise ConfigError(f"{param('scheduler')} {run.settings.scheduler} (and {param('warmup_epochs')}) needs "
                              f"the length of an epoch, which a stream does not tell: set {param('epoch_length')} "
                              f"(batches per epoch), or use {param('scheduler')} none or plateau") from None
        return None


def _agree_on(path: Path | None, checkpoints: Path) -> None:
    """Every rank must resume from the same file (or none): else one line, on every rank alike."""
    found = idist.all_gather(str(path.resolve()) if path else "none")
    if len(set(found)) > 1:
        seen = ", ".join(f"rank {r}: {Path(f).name if f != 'none' else 'none'}" for r, f in enumerate(found))
        raise ConfigError(f"the processes found different checkpoints to resume from in {checkpoints} ({seen}): "
                          f"{param('output_dir')} must be one folder that every process sees (a shared filesystem)")


def _resume(run: Run, resume_state: tuple[Path, dict] | None) -> None:
    checkpoints = run.output_dir / "checkpoints"
    if run.settings.resume == "auto":
        resume_state = find_resume_checkpoint(checkpoints, log=write_line)
        if resume_state is None:
            write_line(f"No checkpoint in {checkpoints}: starting a new run")
    if idist.get_world_size() > 1:
        _agree_on(resume_state[0] if resume_state else None, checkpoints)
    if resume_state is None:
        return
    path, state = resume_state
    restore(run.to_save, state, path)
    run.checkpoint.load_bookkeeping(state, path)
    run.resumed_from = path
    write_line(f"Resumed from {path} ({_place(run.trainer.state)})")
    if run.device.is_cuda and not run.settings.deterministic:
        write_line(f"Resuming on CUDA without {param('deterministic')}: from here the run can differ in the last bits "
                   f"from an uninterrupted one (CUDA kernels may sum in another order each time); with "
                   f"{param('deterministic')} it is the same run, bit for bit")


def _place(state: Any) -> str:
    """Where a restored trainer stands, in the words of the epochs it prints: ``epoch 2, 4 of its 8
    batches done, iteration 12`` (Ignite's ``state.epoch`` counts the epochs completed), or ``end of
    epoch 1, iteration 8``."""
    done, length = batch_in_epoch(state), state.epoch_length
    if not done:
        return f"end of epoch {state.epoch}, iteration {state.iteration}"
    of = f" of its {length}" if length else ""
    return f"epoch {state.epoch + 1}, {done}{of} batches done, iteration {state.iteration}"
