"""Pick the device to train on and move batches onto it."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from engine.errors import ConfigError, param

__all__ = ["available_memory", "move_batch", "prepare_batch", "resolve_device", "split_batch", "tensors_in",
           "to_device"]


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


TARGET_KEYS = ("label", "labels", "target", "targets", "y")


def tensors_in(value: Any) -> list[torch.Tensor]:
    """The tensors in ``value``: itself, or those nested in its dicts, lists and tuples."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in tensors_in(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_in(v)]
    return []


def to_device(data: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """``data`` on ``device``: a tensor, or tensors nested in dicts, lists and tuples (Ignite's
    ``convert_tensor``); a tensor already there is returned as is."""
    if isinstance(data, torch.Tensor):
        return data if data.device == device else data.to(device, non_blocking=non_blocking)
    from ignite.utils import convert_tensor

    return convert_tensor(data, device=device, non_blocking=non_blocking)


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch: a pair, or a dict with one target key (``label``, ``labels``,
    ``target``, ``targets``, ``y``): the inputs are then the one other key (``{"image", "label"}``) or
    the dict of all the others (``{"input_ids", "attention_mask", "labels"}``: the model takes a dict)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        targets = [k for k in TARGET_KEYS if k in batch]
        rest = [k for k in batch if k not in targets]
        if len(targets) == 1 and rest:
            if len(rest) == 1:
                return batch[rest[0]], batch[targets[0]]
            return {k: batch[k] for k in rest}, batch[targets[0]]
        raise ConfigError(f"a batch is a dict with keys {', '.join(map(str, batch))}: name the target "
                          f"{'/'.join(TARGET_KEYS)}, or pass prepare_batch=fn(batch, device, non_blocking) -> "
                          f"(inputs, targets)")
    what = f"a {type(batch).__name__} of {len(batch)}" if isinstance(batch, (tuple, list)) else type(batch).__name__
    raise ConfigError(f"a batch must be (inputs, targets) or a dict with a target key, got {what}: pass "
                      f"prepare_batch=fn(batch, device, non_blocking) -> (inputs, targets)")


def prepare_batch(batch: Any, device: torch.device, non_blocking: bool = False) -> tuple[Any, Any]:
    """The default ``prepare_batch`` (Ignite's name and signature): :func:`split_batch`, then both
    parts on ``device``."""
    x, y = split_batch(batch)
    return to_device(x, device, non_blocking), to_device(y, device, non_blocking)


move_batch = prepare_batch  # its name before batches of other shapes


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors on ``device``: the GPU's free memory, else the machine's available RAM
    (``MemAvailable`` on Linux; elsewhere free pages)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: assume it fits
