"""Errors that mean "the user asked for something that cannot work", printed as one line."""

from __future__ import annotations

__all__ = ["CheckpointError", "CheckpointSaveError", "ConfigError"]


class ConfigError(ValueError):
    """A setting, flag or input that cannot work; the message says what to do instead."""


class CheckpointError(ConfigError):
    """A file that is not a usable checkpoint of this project; the message names the file."""


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (disk full, permissions); the previous checkpoint is intact."""
