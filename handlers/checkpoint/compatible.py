"""What a resume can honour: the settings a checkpoint's position depends on, compared with the run's
``config.json``. A change that would make the saved position point at other samples is refused in one
line naming the setting, its saved and new values and the way out; any other change is accepted, said
in one line and recorded (the new ``config.json``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from engine.errors import ConfigError, param
from engine.settings import RunSettings
from handlers.checkpoint.loading import check_world_size

__all__ = ["POSITION_SETTINGS", "check_resumable"]

# the settings that fix what a checkpoint's (epoch, iteration) means in the data, and why
POSITION_SETTINGS = {
    "batch_size": "the samples each iteration took",
    "seed": "the order of the data (and each batch's random draws)",
    "limit_train_batches": "the batches each epoch holds",
    "epoch_length": "the batches each epoch of the stream holds",
    "accumulation_steps": "where each window of accumulated gradients begins",
}
_NOT_COMPARED = {"output_dir", "resume", "data_path"}  # where and whether: what a resume is; the route instead
_ROUTES = {"memory": "into memory", "loader": "through a DataLoader", "stream": "as a stream"}
_SAME = {"torchvision": "loader"}  # old names


def check_resumable(saved: Mapping[str, Any] | None, settings: RunSettings, point: tuple[Path, Mapping[str, Any]],
                    epoch_length: int | None, resolved: Mapping[str, Any] | None = None) -> list[str]:  # fmt: skip
    """Refuse (a :class:`ConfigError`) a resume whose settings move the saved position: a setting of
    :data:`POSITION_SETTINGS` changed since ``saved`` (the run's ``config.json``), or training data of
    another length per epoch than the checkpoint's ``state`` was written with. Returns the other changes,
    each as ``"--flag old -> new"``. ``resolved``: the values the run decided for settings left to it
    (``monitor``, ``mode``, ``device``, the training data's route), which ``config.json`` records."""
    path, state = point
    check_world_size(state, path)  # the number of processes first: each had its own position
    current = {**settings.to_dict(), **(resolved or {})}
    if saved is not None:
        route, was = current.get("data_route"), saved.get("data_route")
        if route and was and route != was:
            raise ConfigError(
                f"the training data was read {_ROUTES.get(was, was)} when this run was saved and is read "
                f"{_ROUTES.get(route, route)} now ({param('data_path')}): the order of its samples differs, so the "
                f"checkpoint's position would point at other samples; resume with {param('data_path', was)}, or "
                f"start a new run in another {param('output_dir')}")
        for name, meaning in POSITION_SETTINGS.items():
            if name in saved and name in current and _norm(saved[name]) != _norm(current[name]):
                raise ConfigError(
                    f"{param(name)} was {_shown(saved[name])} when this run was saved and is {_shown(current[name])} "
                    f"now: the checkpoint's position counts {meaning}, so it would point at other samples; resume "
                    f"with {param(name, saved[name])}, or start a new run in another {param('output_dir')}")
    trainer = state.get("trainer", {}) if isinstance(state, Mapping) else {}
    saved_length = trainer.get("epoch_length") if isinstance(trainer, Mapping) else None
    if saved_length and epoch_length and int(saved_length) != int(epoch_length):
        raise ConfigError(
            f"the training data holds {epoch_length} batches an epoch now and held {saved_length} when this run "
            f"was saved: its position (iteration {trainer.get('iteration')}) would point at other samples; resume "
            f"with the data it was saved with, or start a new run in another {param('output_dir')}")
    if saved is None:
        return []
    return [_change(name, saved[name], value) for name, value in current.items()
            if name in saved and name not in _NOT_COMPARED and _norm(saved[name]) != _norm(value)]


def _change(name: str, old: Any, new: Any) -> str:
    if isinstance(old, bool) or isinstance(new, bool):  # an on/off flag: its name, not its --no- form
        return f"{name.replace('_', '-')} {'on' if old else 'off'} -> {'on' if new else 'off'}"
    return f"{param(name)} {_shown(old)} -> {_shown(new)}"


def _norm(value: Any) -> Any:
    value = _SAME.get(value, value) if isinstance(value, str) else value
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def _shown(value: Any) -> str:
    return "none" if value is None else str(value)
