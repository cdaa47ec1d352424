"""After training: a model's scores on a held-out test set (:func:`evaluate`) and its outputs on new
data (:func:`predict`), from a checkpoint if given, the data taken as :func:`fit` takes it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Events
from ignite.metrics import Metric
from torch import nn

from engine.batch import ModelCalls, split_batch, to_device
from engine.checks import BatchCheck, input_mismatch
from engine.determinism import deterministic_algorithms
from engine.device import process_device, returned_home
from engine.errors import ConfigError
from engine.evaluator import create_evaluator
from engine.settings import RunSettings
from handlers.checkpoint import load_checkpoint
from handlers.console import quiet_ignite
from handlers.loaders import Data, eval_loader
from handlers.metrics import AccuracyView, validation_metrics
from handlers.precision import resolve_precision

__all__ = ["evaluate", "predict"]


def _ready(model: nn.Module, settings: RunSettings | None, checkpoint: str | Path | None,
           ) -> tuple[RunSettings, torch.device, str | None]:  # fmt: skip
    """The settings checked, Ignite's own log lines off, the model on its device in eval mode, the
    checkpoint's weights loaded."""
    settings = (settings or RunSettings()).check()
    quiet_ignite()  # an error in a batch is our one line, not also Ignite's log of it
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)  # verified: a damaged file is one line
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ConfigError(f"checkpoint {checkpoint} holds another model's weights ({first}): build the model "
                              f"as the run that saved it did") from exc
    run_device = process_device(settings.device)
    device = run_device.device
    model.to(device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    model.eval()
    return settings, device, resolve_precision(settings, run_device)


def evaluate(
    model: nn.Module,
    data: Data,
    settings: RunSettings | None = None,
    *,
    checkpoint: str | Path | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    classification: bool = True,
    metrics: Mapping[str, Metric] | None = None,
    prepare_batch: Callable[[Any, torch.device, bool], tuple[Any, Any]] | None = None,
    model_transform: Callable[[Any], torch.Tensor] | None = None,
    output_transform: Callable[[Any, Any, torch.Tensor], tuple[torch.Tensor, Any]] | None = None,
    collate_fn: Callable[[list], Any] | None = None,
    model_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, Any]:
    """The model's ``loss`` (per-sample mean), ``accuracy`` (classification), your ``metrics`` and
    ``samples`` on ``data`` (a pair of tensors, a ``Dataset`` or a stream), as the validation of
    :func:`fit` computes them: batches of ``settings.val_batch_size``, eval mode, no gradient, every
    sample once (in a distributed run, each process its share; the metrics are summed over them).

    ``checkpoint``: a file of a run (``RunResult.best_path``: the weights it validated best, the
    average of an EMA run) loaded into ``model`` first, verified. The other arguments are
    :func:`fit`'s; the first samples are checked against the model as :func:`fit` checks them.
    Afterwards the model is back on the device it came from (with the checkpoint's weights).
    """
    with returned_home(model):
        settings, device, amp = _ready(model, settings, checkpoint)
        loader = eval_loader(data, settings, device, collate_fn)
        if loss_fn is None:
            loss_fn = nn.CrossEntropyLoss() if classification else nn.MSELoss()
        calls = ModelCalls.of(prepare_batch, model_fn, model_transform, output_transform)
        BatchCheck(calls, loss_fn, classification, device, amp).first_batches(model, {"test": loader})
        scores = validation_metrics(loss_fn, classification, AccuracyView(loss_fn), metrics)
        evaluator = create_evaluator(model, scores, device=device, amp=amp, channels_last=settings.channels_last,
                                     **calls.engine_kwargs())
        with deterministic_algorithms(settings.deterministic):
            evaluator.run(loader)
        return dict(evaluator.state.metrics)


def _inputs(batch: Any) -> Any:
    """A batch's inputs: the first of a pair, what a dict holds besides its target, or the batch itself."""
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0]
    if isinstance(batch, Mapping):
        return split_batch(batch)[0]
    return batch


def _inputs_only(batch: Any, device: torch.device, non_blocking: bool) -> tuple[Any, None]:
    """``predict``'s ``prepare_batch``: the inputs on the device, no targets."""
    return to_device(_inputs(batch), device, non_blocking), None


def predict(
    model: nn.Module,
    data: torch.Tensor | Data,
    settings: RunSettings | None = None,
    *,
    checkpoint: str | Path | None = None,
    prepare_batch: Callable[[Any, torch.device, bool], tuple[Any, Any]] | None = None,
    model_transform: Callable[[Any], torch.Tensor] | None = None,
    collate_fn: Callable[[list], Any] | None = None,
    model_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> torch.Tensor:
    """The model's outputs on ``data``, in its order, as one float tensor on the CPU (``[N, C]``
    logits for a classifier: ``.argmax(1)`` are the classes, ``.softmax(1)`` the probabilities).

    ``data``: a tensor of inputs, a pair ``(inputs, targets)``, or a ``Dataset`` / stream whose samples
    are inputs or ``(input, target)`` pairs (targets are not used). Batches of
    ``settings.val_batch_size``, eval mode, no gradient, in one process. ``checkpoint``,
    ``prepare_batch``, ``model_fn``, ``model_transform`` and ``collate_fn``: as for :func:`evaluate`.
    Afterwards the model is back on the device it came from.
    """
    if idist.get_world_size() > 1:
        raise ConfigError("predict runs in one process: call it outside the distributed run, or on rank 0 alone")
    with returned_home(model):
        return _predict(model, data, settings, checkpoint, collate_fn,
                        ModelCalls.of(prepare_batch or _inputs_only, model_fn, model_transform))


def _predict(model: nn.Module, data: Any, settings: RunSettings | None, checkpoint: str | Path | None,
             collate_fn: Callable | None, calls: ModelCalls) -> torch.Tensor:  # fmt: skip
    settings, device, amp = _ready(model, settings, checkpoint)
    if isinstance(data, torch.Tensor):
        data = (data, torch.zeros(len(data)))  # the targets are not read
    loader = eval_loader(data, settings, device, collate_fn, name="prediction")
    evaluator = create_evaluator(model, {}, device=device, amp=amp, channels_last=settings.channels_last,
                                 **calls.engine_kwargs())
    outputs: list[torch.Tensor] = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output[0].cpu()))
    try:
        with deterministic_algorithms(settings.deterministic):
            evaluator.run(loader)
    except (RuntimeError, TypeError) as exc:  # the inputs' type or layout: one line, as fit says it
        message = input_mismatch(model, getattr(evaluator.state, "inputs", None), exc, "prediction",
                                 calls.model_fn is not None)
        if message is None:
            raise
        raise ConfigError(message) from exc
    if not outputs:
        raise ConfigError("the prediction data yielded no batch: there is nothing to predict")
    return torch.cat(outputs)
