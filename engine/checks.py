"""The user's data against the user's model, checked once before the first step (and again on the batch
that fails, if one does): every mismatch is one line naming the set, what was found and what to do."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from engine.amp import autocast_context
from engine.data import InMemoryLoader
from engine.errors import ConfigError

__all__ = ["check_batch", "check_first_batches", "check_targets", "diagnose", "peek_batch"]

_ELEMENTWISE = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCELoss, nn.BCEWithLogitsLoss)


def _shape(t: Any) -> str:
    return f"[{', '.join(map(str, t.shape))}]" if isinstance(t, torch.Tensor) else type(t).__name__


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


def diagnose(y_pred: Any, y: Any, *, classification: bool, loss_fn: Callable, name: str) -> str | None:
    """Why ``loss_fn(y_pred, y)`` cannot work (or would silently broadcast), in one line; ``None`` if it can."""
    if not isinstance(y_pred, torch.Tensor) or not isinstance(y, torch.Tensor):
        return None  # dicts and tuples: model_transform's and prepare_batch's business (said elsewhere)
    where = f"the {name} set"
    if classification and isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
        if y_pred.dim() < 2:
            return (f"the model's output for {where} is {_shape(y_pred)}, but a classifier's is [N, C] (C classes): "
                    f"give it one output per class, or pass classification=False")
        classes = y_pred.shape[1]
        if y.is_floating_point() and y.shape == y_pred.shape:
            return None  # class probabilities (soft labels)
        if y.shape != (y_pred.shape[0], *y_pred.shape[2:]):
            return (f"{where}'s targets are {_shape(y)} against the model's output {_shape(y_pred)}: class labels "
                    f"must be [N] (one integer per sample; y.view(-1) if they are [N, 1])")
        try:
            check_targets(y, classes, name, getattr(loss_fn, "ignore_index", -100))
        except ConfigError as exc:
            return str(exc)
        return None
    if isinstance(loss_fn, _ELEMENTWISE) and y_pred.shape != y.shape:
        return (f"the model's output {_shape(y_pred)} and {where}'s targets {_shape(y)} differ in shape, so the loss "
                f"would broadcast them (or fail): reshape the targets (y.view(-1, 1) for [N] against [N, 1]) or the "
                f"output to match")
    try:
        loss_fn(y_pred, y)
    except Exception as exc:  # the loss cannot take them: say why, in its own words
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"the loss cannot take the model's output {_shape(y_pred)} and {where}'s targets {_shape(y)}: {first}"
    return None


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
) -> None:
    """One forward of ``batch`` in eval mode, then :func:`diagnose`: a :class:`ConfigError` naming
    ``name`` for the first mismatch. ``all_targets`` (a set held as tensors): every label is checked."""
    from engine.trainer import predict

    was_training = model.training
    model.eval()
    try:
        x, y = prepare_batch(batch, device, False)
        with autocast_context(device, amp):
            y_pred = predict(model, x, model_transform)
        message = diagnose(y_pred.float(), y, classification=classification, loss_fn=loss_fn, name=name)
        if message is not None:
            raise ConfigError(message)
        labels = isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)) and y_pred.dim() >= 2
        if classification and labels and all_targets is not None and not all_targets.is_floating_point():
            check_targets(all_targets, y_pred.shape[1], name, getattr(loss_fn, "ignore_index", -100))
    finally:
        model.train(was_training)


def check_first_batches(model: nn.Module, loaders: dict[str, Any], **options: Any) -> None:
    """:func:`check_batch` on the first few samples of each set (``{"training": loader, ...}``) that
    can be read without moving it on, every label of those held as tensors; loaders keep their place."""
    for name, loader in loaders.items():
        batch = peek_batch(loader)
        if batch is not None:
            targets = loader.y if isinstance(loader, InMemoryLoader) else None
            check_batch(model, batch, name, all_targets=targets, **options)
