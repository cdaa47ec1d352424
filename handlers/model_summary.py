"""A model summary at the start of a run: parameters, trainable parameters, size, input and output shapes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn

from engine.batch import split_batch

__all__ = ["ModelSummary", "summarize"]


def _shape(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return list(value.shape)
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_shape(v) for v in value]
    return type(value).__name__


def summarize(model: nn.Module, inputs: Any = None, outputs: Any = None) -> dict[str, Any]:
    """``parameters``, ``trainable``, ``size_mb`` (parameters and buffers), and the shapes of ``inputs``
    and ``outputs`` when given."""
    params = list(model.parameters())
    size = sum(t.numel() * t.element_size() for t in [*params, *model.buffers()])
    info: dict[str, Any] = {"parameters": sum(p.numel() for p in params),
                            "trainable": sum(p.numel() for p in params if p.requires_grad),
                            "size_mb": round(size / 2**20, 3)}  # fmt: skip
    if inputs is not None:
        info["input_shape"] = _shape(inputs)
    if outputs is not None:
        info["output_shape"] = _shape(outputs)
    return info


def summary_line(info: dict[str, Any]) -> str:
    text = (f"Model: {info['parameters']:,} parameters ({info['trainable']:,} trainable), "
            f"{info['size_mb']:.2f} MB")  # fmt: skip
    if "input_shape" in info:
        text += f"; input {info['input_shape']} -> output {info.get('output_shape')}"
    return text


class ModelSummary:
    """After the first training batch of this process: one line (:func:`summary_line`), and
    ``on_summary(info)`` (the run puts it into config.json and TensorBoard's text tab). Then it
    detaches itself: nothing more per iteration (with ``--profile`` it stays, returning at once)."""

    def __init__(self, model: nn.Module, on_summary: Callable[[dict[str, Any]], None] | None = None,
                 log: Callable[[str], None] = print) -> None:  # fmt: skip
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.on_summary = on_summary
        self.log = log
        self.info: dict[str, Any] | None = None

    def attach(self, trainer: Engine) -> ModelSummary:
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._first_batch)
        return self

    def _first_batch(self, engine: Engine) -> None:
        if self.info is not None:
            return
        try:
            engine.remove_event_handler(self._first_batch, Events.ITERATION_COMPLETED)
        except ValueError:  # wrapped by a profiler: it stays, and returns at once from now on
            pass
        try:
            inputs = split_batch(engine.state.batch)[0]
        except Exception:  # a batch only the user's prepare_batch understands
            inputs = None
        output = engine.state.output
        self.info = summarize(self.model, inputs, output.get("y_pred") if isinstance(output, dict) else None)
        self.log(summary_line(self.info))
        if self.on_summary is not None:
            self.on_summary(self.info)
