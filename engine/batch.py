"""A batch's structure: its inputs and targets (:func:`split_batch`), moved onto a device
(:func:`prepare_batch`, Ignite's name and signature), and the callables through which a run reads
batches and calls the model (:class:`ModelCalls`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.errors import ConfigError

__all__ = ["TARGET_KEYS", "ModelCalls", "move_batch", "prepare_batch", "split_batch", "tensors_in", "to_device"]


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
_DEFAULT_PREPARE = prepare_batch


@dataclass(frozen=True)
class ModelCalls:
    """How a run reads a batch and calls the model, the same for the trainer, the evaluator, the checks,
    the LR finder, ``evaluate`` and ``predict``: one object instead of four loose callables.

    Attributes:
        prepare_batch: ``fn(batch, device, non_blocking) -> (x, y)`` (default :func:`prepare_batch`).
        model_fn: ``fn(model, x) -> output`` (default ``model(x)``).
        model_transform: ``fn(model_output) -> y_pred``, for a model returning a dict or a tuple.
        output_transform: ``fn(x, y, y_pred) -> (y_pred, y)``: what the metrics see.
    """

    prepare_batch: Callable[[Any, torch.device, bool], tuple[Any, Any]] = prepare_batch
    model_fn: Callable[[nn.Module, Any], Any] | None = None
    model_transform: Callable[[Any], Any] | None = None
    output_transform: Callable[[Any, Any, Any], tuple[Any, Any]] | None = None

    @classmethod
    def of(cls, prepare_batch: Callable | None = None, model_fn: Callable | None = None,
           model_transform: Callable | None = None, output_transform: Callable | None = None) -> ModelCalls:
        """The calls given, the defaults for those that are ``None``."""
        return cls(prepare_batch or _DEFAULT_PREPARE, model_fn, model_transform, output_transform)

    def engine_kwargs(self, prepare_batch: Callable | None = None) -> dict[str, Any]:
        """The keywords of :func:`engine.create_trainer` / :func:`engine.create_evaluator`;
        ``prepare_batch`` overrides the batch's (a run's label guard wraps it)."""
        return {"prepare_batch": prepare_batch or self.prepare_batch, "model_fn": self.model_fn,
                "model_transform": self.model_transform, "output_transform": self.output_transform}
