"""The training engine: Ignite ``Engine`` factories for training and evaluation, fast data paths,
the run settings, and the errors and exit codes of a run."""

from engine import workers  # noqa: F401  (forked DataLoader workers freeze what they inherit)
from engine.imports import frozen_imports

with frozen_imports():  # torch and Ignite come in here: ~0.7 s less of the collector per process
    from engine.amp import autocast_context, make_grad_scaler
    from engine.batch import ModelCalls, move_batch
    from engine.data import InMemoryLoader
    from engine.datasets import check_classification_data, load_dataset
    from engine.device import resolve_device
    from engine.errors import (
        EXIT_NAN,
        EXIT_OK,
        EXIT_SAVE,
        EXIT_USAGE,
        CheckpointError,
        CheckpointSaveError,
        ConfigError,
        flag_names,
        param,
    )
    from engine.evaluator import create_evaluator, default_metrics
    from engine.run_lock import RunLock
    from engine.sampler import ResumableRandomSampler
    from engine.settings import RunSettings
    from engine.trainer import TrainStep, create_trainer

__all__ = [
    "EXIT_NAN",
    "EXIT_OK",
    "EXIT_SAVE",
    "EXIT_USAGE",
    "CheckpointError",
    "CheckpointSaveError",
    "ConfigError",
    "InMemoryLoader",
    "ModelCalls",
    "ResumableRandomSampler",
    "RunLock",
    "RunSettings",
    "TrainStep",
    "autocast_context",
    "check_classification_data",
    "create_evaluator",
    "create_trainer",
    "default_metrics",
    "flag_names",
    "load_dataset",
    "make_grad_scaler",
    "move_batch",
    "param",
    "resolve_device",
]
