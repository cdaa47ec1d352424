"""Pick the device to train on and move batches onto it."""

from __future__ import annotations

from typing import Any

import torch

from engine.errors import ConfigError, param

__all__ = ["resolve_device", "move_batch"]


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """Return the device to use: ``name`` if given, else CUDA, then MPS, then CPU.

    Args:
        name: ``"auto"``/``None`` for automatic choice, or any ``torch.device`` string.

    Raises:
        ConfigError: the name is not a device, or that device is not available here.
    """
    if isinstance(name, torch.device):
        return name
    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here: "
                          f"use {param('device', 'cpu')} or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device {name!r} asked for, but MPS is not available here: "
                          f"use {param('device', 'cpu')} or auto")
    return device


def move_batch(batch: Any, device: torch.device, non_blocking: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Split an ``(x, y)`` batch and move both tensors to ``device``.

    ``non_blocking`` only has an effect for pinned CPU tensors copied to CUDA.
    """
    x, y = batch[0], batch[1]
    if x.device != device:
        x = x.to(device, non_blocking=non_blocking)
    if y.device != device:
        y = y.to(device, non_blocking=non_blocking)
    return x, y
