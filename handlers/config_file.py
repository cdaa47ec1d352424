"""Replay a run: the settings of a run's ``config.json`` (or a TOML file with the same keys), read with
the standard library, for ``--config PATH``; flags given on the command line override them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from engine.errors import ConfigError, param

__all__ = ["RECORDED_KEYS", "load_config", "settings_in_config"]

# what a run writes into config.json besides its settings: records of the run, not settings to replay
RECORDED_KEYS = frozenset({"world_size", "resumed_from", "precision", "precision_choice", "train_transform",
                           "pair_transform", "model_summary", "lr_finder", "data_route"})


def load_config(path: str | Path) -> dict[str, Any]:
    """The key/value table of a ``.json`` or ``.toml`` file; one line (:class:`ConfigError`) if it
    cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{param('config')} {path}: no such file")
    try:
        if path.suffix.lower() == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                raise ConfigError(f"{param('config')} {path}: reading TOML needs Python 3.11 or later; "
                                  f"use the run's config.json") from None
            with path.open("rb") as f:
                data = tomllib.load(f)
        else:
            data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ConfigError(f"{param('config')} {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: "
                          f"{str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{param('config')} {path} must hold a table of settings, not a {type(data).__name__}")
    return data


def settings_in_config(data: dict[str, Any], cls: type, path: str | Path) -> dict[str, Any]:
    """The entries of ``data`` that are settings of ``cls``; an unknown key is one line naming it."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in data if k not in fields and k not in RECORDED_KEYS)
    if unknown:
        raise ConfigError(f"{param('config')} {path}: unknown setting(s) {', '.join(map(repr, unknown))}; "
                          f"a setting is one of the flags of --help (as its name: --warmup-epochs is warmup_epochs)")
    return {k: v for k, v in data.items() if k in fields}
