"""Handlers that attach to the trainer and evaluator engines: everything beyond the minimal loop."""

from handlers.checkpoint import (
    SafeDiskSaver,
    TrainingCheckpoint,
    find_resume_checkpoint,
    last_checkpoints,
    load_checkpoint,
    restore,
)
from handlers.console import ConsoleLogger, write_line
from handlers.early_stopping import EarlyStopping
from handlers.history import History, write_json_atomic
from handlers.lr_schedule import SCHEDULERS, LRSchedule
from handlers.metrics import SampleCount, TrainMetrics
from handlers.nan_guard import NanGuard
from handlers.progress import Progress, progress_wanted
from handlers.tensorboard import MisclassifiedCollector, TensorBoardLogging
from handlers.ordering import Stage, attach_ordered, ordered_handlers
from handlers.signals import GracefulStop
from handlers.rng import RNGState, seed_everything
from handlers.validation import Validation

__all__ = [
    "SCHEDULERS",
    "ConsoleLogger",
    "EarlyStopping",
    "GracefulStop",
    "History",
    "LRSchedule",
    "MisclassifiedCollector",
    "NanGuard",
    "Progress",
    "RNGState",
    "SafeDiskSaver",
    "SampleCount",
    "Stage",
    "TensorBoardLogging",
    "TrainMetrics",
    "TrainingCheckpoint",
    "Validation",
    "attach_ordered",
    "find_resume_checkpoint",
    "last_checkpoints",
    "load_checkpoint",
    "ordered_handlers",
    "progress_wanted",
    "restore",
    "seed_everything",
    "write_json_atomic",
    "write_line",
]
