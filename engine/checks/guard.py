"""The per-step guard: class labels checked on the host before a batch reaches the device, so that a label
out of range is one line on a GPU too, not a device-side assert (:class:`LabelGuard`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from engine.batch import split_batch
from engine.errors import ConfigError

__all__ = ["BatchError", "LabelGuard", "check_targets"]


def check_targets(y: torch.Tensor, classes: int, name: str, ignore_index: int = -100) -> None:
    """Class labels: integers in ``[0, classes)`` (or ``ignore_index``); raise one line if not."""
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ConfigError(f"the {name} set's targets are {str(y.dtype).replace('torch.', '')}, but class labels must "
                          f"be integers: convert them with .long() (or pass classification=False for regression)")
    labels = y[y != ignore_index]
    if not labels.numel():
        return
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= classes:
        bad = low if low < 0 else high
        raise ConfigError(f"the {name} set holds class {bad}, but the model has {classes} outputs (classes 0 to "
                          f"{classes - 1}): give the model {max(high + 1, classes)} outputs, or map the labels to "
                          f"0..{classes - 1}")


class BatchError(ConfigError):
    """A batch met during the run that the model cannot take (the run adds where it was found)."""


class LabelGuard:
    """A ``prepare_batch`` that checks each batch's class labels on the host before they are copied
    to the device: on a GPU a label out of range is a device-side assert inside the loss kernel,
    which kills the process's CUDA context (nothing can be saved after it); here it is one line,
    as on a CPU. Labels already on the device (a set held there, checked whole once) and batches
    of other shapes pass unchecked. The check is two reductions over a CPU tensor of batch size
    (a few microseconds), and it makes the host wait for nothing.

    Args:
        prepare_batch: the run's ``prepare_batch(batch, device, non_blocking) -> (x, y)``.
        name: the set, in the message (``"training"``, ``"validation"``).
        classes: the model's outputs per sample (labels must lie in ``[0, classes)``); ``None`` (a
            stream, whose first batch could not be read ahead): ``probe(batch)`` finds it from the first
            batch met (:func:`check_batch`, which checks that batch whole).
        ignore_index: the loss's label to ignore (cross-entropy's ``-100``).
    """

    def __init__(self, prepare_batch: Callable, name: str, classes: int | None, ignore_index: int = -100,
                 probe: Callable[[Any], int | None] | None = None) -> None:  # fmt: skip
        if not callable(prepare_batch):
            raise TypeError(f"prepare_batch must be callable, got {type(prepare_batch).__name__}")
        if classes is None and probe is None:
            raise ValueError("without classes, a probe(batch) -> classes is needed")
        if classes is not None and (not isinstance(classes, int) or classes < 1):
            raise ValueError(f"classes must be a positive integer, got {classes!r}")
        self.prepare_batch, self.name, self.classes, self.ignore_index = prepare_batch, name, classes, ignore_index
        self.probe = probe

    def __call__(self, batch: Any, device: torch.device, non_blocking: bool = False) -> tuple[Any, Any]:
        if self.classes is None:
            self.classes = self.probe(batch) or 0  # 0: not class labels after all; nothing to check
        try:
            y = split_batch(batch)[1]
        except ConfigError:  # a structure only the user's prepare_batch knows
            y = None
        if self.classes and isinstance(y, torch.Tensor) and y.device.type == "cpu" and y.numel() \
                and not y.is_floating_point() and y.dtype != torch.bool:  # fmt: skip
            low, high = torch.aminmax(y)
            if low < 0 or high >= self.classes:
                try:
                    check_targets(y, self.classes, self.name, self.ignore_index)
                except ConfigError as exc:
                    raise BatchError(str(exc)) from None
        return self.prepare_batch(batch, device, non_blocking)
