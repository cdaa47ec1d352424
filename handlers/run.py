"""The run (:class:`Run`): the engines and every default handler of one training run, as
:func:`handlers.attach.attach_run` attached them; ``run.run()`` trains to ``settings.epochs`` (or until
a handler stops it), writes the last records and says how it ended (:class:`RunResult`, an exit code)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine, Events

from engine.checks import BatchError
from engine.determinism import deterministic_algorithms, nondeterministic_op
from engine.device import RunDevice, process_device
from engine.epoch import mid_epoch
from engine.errors import EXIT_NAN, EXIT_OK, ConfigError
from engine.run_lock import RunLock
from engine.settings import RunSettings
from handlers.adapters import release_workers
from handlers.checkpoint import TrainingCheckpoint
from handlers.console import write_line
from handlers.early_stopping import EarlyStopping
from handlers.history import History
from handlers.lr_schedule import LRSchedule
from handlers.metrics import TrainMetrics
from handlers.nan_guard import NanGuard
from handlers.ordering import by_iteration
from handlers.profile import Profile
from handlers.signals import GracefulStop
from handlers.tensorboard import TensorBoardLogging
from handlers.watchdog import StallWatchdog

__all__ = ["Run", "RunResult"]


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


class Run:
    """Every default handler of a run, attached; built by :func:`attach_run`."""

    def __init__(self, trainer: Engine, evaluator: Engine, train_loader: Iterable, settings: RunSettings,
                 output_dir: Path, classification: bool, device: RunDevice | None = None,
                 val_loader: Iterable | None = None) -> None:  # fmt: skip
        self.trainer, self.evaluator, self.train_loader = trainer, evaluator, train_loader
        self.val_loader = val_loader
        self.device = device or process_device(settings.device)
        self.settings, self.output_dir, self.classification = settings, output_dir, classification
        self.monitor, self.mode = settings.watched(classification)
        self.started = _IMPORTED
        self.config: dict[str, Any] = {}
        self.resumed_from: Path | None = None
        self.explain: Callable[[Any, str], str | None] | None = None  # (batch, set name) -> what is wrong
        self.to_save: dict[str, Any] = {}  # what every checkpoint holds
        # the default handlers, set by attach_run (None until then, or where the settings leave one off)
        self.lock: RunLock | None = None
        self.train_metrics: TrainMetrics | None = None
        self.lr_schedule: LRSchedule | None = None
        self.history: History | None = None
        self.early_stopping: EarlyStopping | None = None
        self.nan_guard: NanGuard | None = None
        self.checkpoint: TrainingCheckpoint | None = None
        self.stop: GracefulStop | None = None
        self.tensorboard: TensorBoardLogging | None = None
        self.profile: Profile | None = None
        self.watchdog: StallWatchdog | None = None

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
            where, done = f"epoch {best['epoch']}", f"{len(self.history.epochs)} epoch(s) in all"
            if by_iteration(self.trainer):  # a row per validation
                where += f", iteration {best['iteration']}"
                done = f"{len(self.history.epochs)} validation(s) in {self.trainer.state.epoch} epoch(s)"
            write_line(f"Best {self.monitor.replace('_', ' ')}: {_shown(self.monitor, best[self.monitor])} at "
                       f"{where} ({done}, this process {time.perf_counter() - self.started:.1f} s)")
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
        if self.watchdog is not None:
            self.watchdog.stop()
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


