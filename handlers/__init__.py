"""Handlers that attach to the trainer and evaluator engines (everything beyond the minimal loop),
and the run that attaches them all: :func:`fit`, :func:`attach_run`, and the command line (``handlers.cli``)."""

from engine.imports import frozen_imports

with frozen_imports():  # torch and Ignite come in here: ~0.7 s less of the collector per process
    from engine.files import write_json_atomic
    from handlers.attach import attach_run
    from handlers.checkpoint import (
        SafeDiskSaver,
        TrainingCheckpoint,
        find_resume_checkpoint,
        last_checkpoints,
        load_checkpoint,
        restore,
        verify_checkpoint,
    )
    from handlers.console import ConsoleLogger, write_line
    from handlers.early_stopping import EarlyStopping
    from handlers.evaluate import evaluate, predict
    from handlers.fit import build_run, fit, make_optimizer
    from handlers.history import History
    from handlers.loaders import make_loaders
    from handlers.lr_schedule import LRSchedule
    from handlers.metrics import SampleCount, TrainMetrics
    from handlers.nan_guard import NanGuard
    from handlers.ordering import Stage, attach_ordered, ordered_handlers
    from handlers.progress import Progress, progress_wanted
    from handlers.rng import RNGState, seed_everything
    from handlers.run import Run, RunResult
    from handlers.signals import GracefulStop
    from handlers.tensorboard import MisclassifiedCollector, TensorBoardLogging
    from handlers.validation import Validation

__all__ = [
    "ConsoleLogger",
    "EarlyStopping",
    "GracefulStop",
    "History",
    "LRSchedule",
    "MisclassifiedCollector",
    "NanGuard",
    "Progress",
    "RNGState",
    "Run",
    "RunResult",
    "SafeDiskSaver",
    "SampleCount",
    "Stage",
    "TensorBoardLogging",
    "TrainMetrics",
    "TrainingCheckpoint",
    "Validation",
    "attach_ordered",
    "attach_run",
    "build_run",
    "evaluate",
    "fit",
    "find_resume_checkpoint",
    "last_checkpoints",
    "load_checkpoint",
    "make_loaders",
    "make_optimizer",
    "ordered_handlers",
    "predict",
    "progress_wanted",
    "restore",
    "seed_everything",
    "verify_checkpoint",
    "write_json_atomic",
    "write_line",
]
