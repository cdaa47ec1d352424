"""Preflight: the user's data against the user's model, checked once before the first step (and again on
the batch that fails, if one does): a forward of the first few samples of each set, without moving a
loader on, then :func:`~engine.checks.explain.diagnose`."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from engine.amp import autocast_context
from engine.batch import ModelCalls
from engine.checks.explain import diagnose, first_line, input_mismatch
from engine.checks.guard import check_targets
from engine.checks.lints import pixel_scale, probability_outputs
from engine.data import InMemoryLoader
from engine.errors import ConfigError

__all__ = ["BatchCheck", "check_batch", "check_first_batches", "peek_batch"]


def peek_batch(loader: Any, size: int = 16) -> Any | None:
    """Up to ``size`` samples of ``loader``'s data as a batch, without moving the loader on (its order,
    its position, a stream's place); ``None`` for a stream, which cannot be read without consuming it."""
    if isinstance(loader, InMemoryLoader):
        return loader.x[:size], loader.y[:size]
    if isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset):
        dataset = loader.dataset
        n = min(size, len(dataset))
        fetch = getattr(dataset, "__getitems__", None)
        samples = fetch(list(range(n))) if callable(fetch) else [dataset[i] for i in range(n)]
        return (loader.collate_fn or (lambda s: s))(samples)
    return None


@torch.no_grad()
def check_batch(
    model: nn.Module,
    batch: Any,
    name: str,
    *,
    prepare_batch: Callable,
    model_transform: Callable | None,
    loss_fn: Callable,
    classification: bool,
    device: torch.device,
    amp: str | None = None,
    all_targets: torch.Tensor | None = None,
    log: Callable[[str], None] | None = None,
    model_fn: Callable[[nn.Module, Any], Any] | None = None,
    seen: dict[str, Any] | None = None,
) -> int | None:
    """One forward of ``batch`` in eval mode, then :func:`diagnose`: a :class:`ConfigError` naming
    ``name`` for the first mismatch. ``all_targets`` (a set held as tensors): every label is checked.
    ``log``: what is odd but not wrong is said there (outputs that are already probabilities).
    ``seen``: filled with what the forward showed (``output_dims``: 4 for a dense ``[N, C, H, W]`` output).
    Returns the number of classes when the loss takes class labels (the output's width), else ``None``."""
    from engine.trainer import predict

    was_training = model.training
    model.eval()
    try:
        x, y = prepare_batch(batch, device, False)
        with autocast_context(device, amp):
            try:
                y_pred = predict(model, x, model_transform, model_fn)
            except (RuntimeError, TypeError) as exc:
                message = input_mismatch(model, x, exc, name, model_fn is not None)
                if message is None:
                    raise
                raise ConfigError(message) from exc
        message = diagnose(y_pred.float(), y, classification=classification, loss_fn=loss_fn, name=name)
        if message is not None:
            raise ConfigError(message)
        if log is not None:
            for odd in (pixel_scale(x, name), probability_outputs(y_pred, loss_fn)):
                if odd is not None:
                    log(odd)
        labels = isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)) and y_pred.dim() >= 2
        if classification and labels and all_targets is not None and not all_targets.is_floating_point():
            check_targets(all_targets, y_pred.shape[1], name, getattr(loss_fn, "ignore_index", -100))
        if seen is not None:
            seen["output_dims"] = y_pred.dim()
        return int(y_pred.shape[1]) if classification and labels else None
    finally:
        model.train(was_training)


def check_first_batches(model: nn.Module, loaders: dict[str, Any], log: Callable[[str], None] | None = None,
                        **options: Any) -> int | None:
    """:func:`check_batch` on the first few samples of each set (``{"training": loader, ...}``) that
    can be read without moving it on, every label of those held as tensors; loaders keep their place.
    ``log``: :func:`check_batch`'s, for the first set checked. Returns the number of classes the
    model's output has (when its loss takes class labels and a set could be read), else ``None``."""
    classes = None
    for name, loader in loaders.items():
        try:
            batch = peek_batch(loader)
        except RuntimeError as exc:  # the default collate cannot stack samples of different shapes
            if "equal size" not in str(exc) and "same size" not in str(exc):
                raise
            raise ConfigError(f"the {name} set's samples cannot be stacked into a batch ({first_line(exc)}): make "
                              f"them one shape in __getitem__ (crop, pad, resize), or pass collate_fn=fn(samples) "
                              f"-> batch") from exc
        except TypeError as exc:  # nor batch what is not a tensor, an array, a number, a dict or a list
            if not str(exc).startswith("default_collate: batch must contain"):
                raise
            kind = re.search(r"found <class '([\w.]+)'>", str(exc))
            held = kind.group(1) if kind else "something else"
            fix = ("add transform=torchvision.transforms.ToTensor() to the dataset (PIL images to [C, H, W] "
                   "tensors in [0, 1])" if held.startswith("PIL.") else
                   "return tensors, NumPy arrays or numbers from __getitem__")
            raise ConfigError(f"the {name} set's samples hold {held}, which a batch cannot hold: {fix}, or pass "
                              f"collate_fn=fn(samples) -> batch") from exc
        if batch is not None:
            targets = loader.y if isinstance(loader, InMemoryLoader) else None
            classes = check_batch(model, batch, name, all_targets=targets, log=log, **options) or classes
            log = None  # said once
    return classes


@dataclass(frozen=True)
class BatchCheck:
    """What checking a batch against the model needs, gathered once for a run: how the model is called
    and a batch read (:class:`~engine.batch.ModelCalls`), the loss, the device and the precision."""

    calls: ModelCalls
    loss_fn: Callable
    classification: bool
    device: torch.device
    amp: str | None = None

    def options(self) -> dict[str, Any]:
        """The keywords of :func:`check_batch` and :func:`check_first_batches`."""
        return {"prepare_batch": self.calls.prepare_batch, "model_transform": self.calls.model_transform,
                "model_fn": self.calls.model_fn, "loss_fn": self.loss_fn, "classification": self.classification,
                "device": self.device, "amp": self.amp}

    def batch(self, model: nn.Module, batch: Any, name: str) -> int | None:
        """:func:`check_batch` of one batch."""
        return check_batch(model, batch, name, **self.options())

    def first_batches(self, model: nn.Module, loaders: dict[str, Any], log: Callable[[str], None] | None = None,
                      seen: dict[str, Any] | None = None) -> int | None:  # fmt: skip
        """:func:`check_first_batches` of each set (``seen``: see :func:`check_batch`)."""
        return check_first_batches(model, loaders, log=log, seen=seen, **self.options())
