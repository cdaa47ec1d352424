"""The evaluation engine: forward passes under ``torch.no_grad()`` feeding Ignite metrics."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from ignite.engine import Engine
from ignite.metrics import Accuracy, Loss, Metric
from torch import nn

from engine.amp import autocast_context
from engine.batch import prepare_batch as default_prepare_batch
from engine.device import resolve_device
from engine.trainer import predict

__all__ = ["create_evaluator", "default_metrics"]


def default_metrics(loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> dict[str, Metric]:
    """Per-sample mean ``loss`` and ``accuracy`` (Ignite's ``Loss`` and ``Accuracy``)."""
    return {"loss": Loss(loss_fn), "accuracy": Accuracy()}


def create_evaluator(
    model: nn.Module,
    metrics: Mapping[str, Metric],
    *,
    device: str | torch.device | None = None,
    non_blocking: bool | None = None,
    amp: str | None = None,
    channels_last: bool = False,
    prepare_batch: Callable[[Any, torch.device, bool], tuple[Any, Any]] | None = None,
    model_transform: Callable[[Any], torch.Tensor] | None = None,
    output_transform: Callable[[Any, Any, torch.Tensor], tuple[torch.Tensor, Any]] | None = None,
    model_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> Engine:
    """Build an evaluator: an Ignite ``Engine`` whose output is ``(y_pred, y)``, with ``metrics`` attached.

    Metrics are exact per-sample means over the whole pass, a short last batch included;
    after ``evaluator.run(loader)`` they are in ``evaluator.state.metrics``. ``prepare_batch``,
    ``model_fn``, ``model_transform`` and ``output_transform`` as for the trainer (Ignite's
    ``create_supervised_evaluator``); the prepared input of the last batch is ``state.inputs``.
    """
    prepare = prepare_batch or default_prepare_batch
    device = resolve_device(device)
    if non_blocking is None:
        non_blocking = device.type == "cuda"
    autocast_context(device, amp)  # validate now

    @torch.no_grad()
    def step(engine: Engine, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if model.training:
            model.eval()
        x, y = prepare(batch, device, non_blocking)
        engine.state.inputs = x
        if channels_last and isinstance(x, torch.Tensor) and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, amp):
            y_pred = predict(model, x, model_transform, model_fn)
        if output_transform is not None:
            return output_transform(x, y, y_pred.float())
        return y_pred.float(), y

    engine = Engine(step)
    for name, metric in metrics.items():
        metric.attach(engine, name)
    return engine
