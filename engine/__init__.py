"""The training engine: Ignite ``Engine`` factories for training and evaluation, and fast data paths."""

from engine.amp import autocast_context, make_grad_scaler
from engine.data import InMemoryLoader
from engine.device import move_batch, resolve_device
from engine.errors import CheckpointError, CheckpointSaveError, ConfigError
from engine.run_lock import RunLock
from engine.sampler import ResumableRandomSampler
from engine.evaluator import create_evaluator, default_metrics
from engine.trainer import TrainStep, create_trainer

__all__ = [
    "CheckpointError",
    "CheckpointSaveError",
    "ConfigError",
    "InMemoryLoader",
    "ResumableRandomSampler",
    "RunLock",
    "TrainStep",
    "autocast_context",
    "create_evaluator",
    "create_trainer",
    "default_metrics",
    "make_grad_scaler",
    "move_batch",
    "resolve_device",
]
