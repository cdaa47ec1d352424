"""Error translation: why the model's forward or the loss failed on a batch, in one line naming the set,
what was found and what to do (:func:`input_mismatch`, :func:`diagnose`)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from engine.batch import tensors_in
from engine.checks.guard import check_targets
from engine.errors import ConfigError

__all__ = ["diagnose", "first_line", "input_mismatch"]


_ELEMENTWISE = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCELoss, nn.BCEWithLogitsLoss)


def _shape(t: Any) -> str:
    if isinstance(t, (list, tuple)):
        return f"a {type(t).__name__} of {len(t)}"
    return f"[{', '.join(map(str, t.shape))}]" if isinstance(t, torch.Tensor) else type(t).__name__


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


_CHANNELS = re.compile(r"expected input\[([\d, ]+)\] to have (\d+) channels, but got (\d+) channels")
_MATMUL = re.compile(r"mat1 and mat2 shapes cannot be multiplied \((\d+)x(\d+) and (\d+)x(\d+)\)")
_ARGUMENTS = re.compile(r"missing \d+ required positional argument|takes \d+ positional arguments? but \d+ w"
                        r"|got an unexpected keyword argument")


def input_mismatch(model: nn.Module, x: Any, exc: BaseException, name: str, own_call: bool = False) -> str | None:
    """Why the model's forward raised ``exc`` on ``x``, when that is the inputs' type, in one line:
    a dict or a tuple of inputs for a forward that takes them as several arguments (``model_fn``), a
    list, tuple or dict where it wants a tensor (samples returning Python lists), images with their
    channels last or none, images not flattened for a ``Linear``, or a dtype other than its parameters'
    (NumPy's float64, uint8 pixels). ``None`` when the inputs look right: then it is the model's own error.
    ``own_call``: the user's ``model_fn`` called the model (then how it is called is not ours to say)."""
    first = first_line(exc)
    kind = type(x).__name__
    if not own_call and isinstance(exc, TypeError) and _ARGUMENTS.search(first):
        if isinstance(x, Mapping):
            keys = ", ".join(map(str, x))
            return (f"the {name} set's batches are dicts, so the model is called with their keys besides the target "
                    f"({keys}) as one dict, but its forward takes separate arguments ({first}): pass model_fn=lambda "
                    f"model, x: model(**x) (each key as the argument of its name), or prepare_batch=fn(batch, device, "
                    f"non_blocking) -> (x, y)")
        if isinstance(x, (tuple, list)):
            return (f"the {name} set's inputs are {_shape(x)}, so the model is called with them as one argument, but "
                    f"its forward takes separate arguments ({first}): pass model_fn=lambda model, x: model(*x), or "
                    f"prepare_batch=fn(batch, device, non_blocking) -> (x, y)")
    if isinstance(x, (list, tuple)) and isinstance(exc, TypeError) and f"not {kind}" in first:
        return (f"the {name} set's inputs reach the model as {_shape(x)}, which it cannot take ({first}): return a "
                f"tensor from __getitem__ (torch.tensor(...), not a Python {kind}), or pass "
                f"prepare_batch=fn(batch, device, non_blocking) -> (x, y)")
    if isinstance(x, Mapping) and isinstance(exc, TypeError) and "not dict" in first:
        keys = ", ".join(map(str, x))
        return (f"the {name} set's batches are dicts, so the model gets their keys besides the target ({keys}) as "
                f"one dict, which it cannot take ({first}): keep one input key beside the target key, make forward "
                f"take the dict, or pass prepare_batch=fn(batch, device, non_blocking) -> (x, y)")
    layout = _channel_layout(x, first, name) or _unflattened(x, first, name)
    if layout is not None:
        return layout
    params = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(params) != 1 or not isinstance(exc, RuntimeError) or not any(
            word in first for word in ("dtype", "type", "not implemented for")):  # fmt: skip
        return None
    (want,) = params
    found = sorted({t.dtype for t in tensors_in(x) if t.dtype != want}, key=str)
    if not found:
        return None
    got = found[0]
    fix = ".float()" if want == torch.float32 else f".to(torch.{_dtype(want)})"
    hint = (" (pixels: x.float() / 255)" if not got.is_floating_point and not got.is_complex else
            " (NumPy arrays are float64: torch.from_numpy(a).float())" if got == torch.float64 else "")
    return (f"the {name} set's inputs are {_dtype(got)}, but the model's parameters are {_dtype(want)} ({first}): "
            f"convert them with {fix}{hint}")


def _channel_layout(x: Any, first: str, name: str) -> str | None:
    """When the model's first convolution refused ``x`` itself for its channels: images with their
    channels last ([N, H, W, C], as NumPy and PIL hold them) or with no channel dimension ([N, H, W])."""
    found = _CHANNELS.search(first)
    if found is None or not isinstance(x, torch.Tensor):
        return None
    given, want = [int(n) for n in found.group(1).split(",")], int(found.group(2))
    shape = list(x.shape)
    if given == shape and x.dim() >= 3 and shape[-1] == want:
        return (f"the {name} set's inputs are {_shape(x)}, channels last, but the model's first convolution takes "
                f"{want} channels first ({first}): put them first in __getitem__ (x.permute(2, 0, 1) for an "
                f"[H, W, C] image; torchvision's ToTensor() does it for PIL images)")
    if given == [1, *shape]:
        grow = "x.unsqueeze(0)" if want == 1 else f"x.unsqueeze(0).expand({want}, -1, -1)"
        return (f"the {name} set's inputs are {_shape(x)}, with no channel dimension, but the model's first "
                f"convolution takes {want} channel(s) ({first}): add it in __getitem__ ({grow} for an [H, W] image)")
    return None


def _unflattened(x: Any, first: str, name: str) -> str | None:
    """When the model's first ``Linear`` refused ``x`` itself: images or sequences not yet flattened
    ([N, 28, 28] into a Linear of 784 features)."""
    found = _MATMUL.search(first)
    if found is None or not isinstance(x, torch.Tensor) or x.dim() < 3:
        return None
    rows, width, features = (int(found.group(i)) for i in (1, 2, 3))
    if rows != x.numel() // x.shape[-1] or width != x.shape[-1] or features != x[0].numel():
        return None
    return (f"the {name} set's inputs are {_shape(x)}, but the model's first Linear takes {features} features "
            f"({first}): flatten them (nn.Flatten() as the model's first layer)")


def diagnose(y_pred: Any, y: Any, *, classification: bool, loss_fn: Callable, name: str) -> str | None:
    """Why ``loss_fn(y_pred, y)`` cannot work (or would silently broadcast), in one line; ``None`` if it can."""
    if not isinstance(y_pred, torch.Tensor):
        return None  # dicts and tuples: model_transform's business (said elsewhere)
    where, tensor = f"the {name} set", isinstance(y, torch.Tensor)  # else a dict for the user's loss, or a list
    if tensor and classification and isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):
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
    if tensor and isinstance(loss_fn, _ELEMENTWISE) and y_pred.shape != y.shape:
        return (f"the model's output {_shape(y_pred)} and {where}'s targets {_shape(y)} differ in shape, so the loss "
                f"would broadcast them (or fail): reshape the targets (y.view(-1, 1) for [N] against [N, 1]) or the "
                f"output to match")
    try:
        loss_fn(y_pred, y)
    except Exception as exc:  # the loss cannot take them: say why, in its own words
        if isinstance(y, (list, tuple)) and y and all(isinstance(v, str) for v in y):
            return (f"{where}'s targets are class names ({y[0]!r}, ...), which the loss cannot take "
                    f"({first_line(exc)}): return each as its class index, an integer (classes = "
                    f"sorted(set(names)); classes.index(name))")
        fix = (": return each target as a number or a tensor from __getitem__, not a Python list"
               if isinstance(y, (list, tuple)) else "")
        return (f"the loss cannot take the model's output {_shape(y_pred)} and {where}'s targets "
                f"{_shape(y) if tensor else f'({_shape(y)})'}: {first_line(exc)}{fix}")
    return None
