"""The user's data against the user's model, checked once before the first step (and again on the batch
that fails, if one does): every mismatch is one line naming the set, what was found and what to do."""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from engine.amp import autocast_context
from engine.data import InMemoryLoader
from engine.device import split_batch, tensors_in
from engine.errors import ConfigError

__all__ = ["BatchError", "LabelGuard", "check_batch", "check_first_batches", "check_targets", "class_balance",
           "diagnose", "has_batch_norm",
           "input_mismatch", "peek_batch", "pixel_scale", "probability_outputs", "unregistered"]

_ELEMENTWISE = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCELoss, nn.BCEWithLogitsLoss)


def _shape(t: Any) -> str:
    if isinstance(t, (list, tuple)):
        return f"a {type(t).__name__} of {len(t)}"
    return f"[{', '.join(map(str, t.shape))}]" if isinstance(t, torch.Tensor) else type(t).__name__


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


_ARGUMENTS = re.compile(r"missing \d+ required positional argument|takes \d+ positional arguments? but \d+ w"
                        r"|got an unexpected keyword argument")


def input_mismatch(model: nn.Module, x: Any, exc: BaseException, name: str, own_call: bool = False) -> str | None:
    """Why the model's forward raised ``exc`` on ``x``, when that is the inputs' type, in one line:
    a dict or a tuple of inputs for a forward that takes them as several arguments (``model_fn``), a
    list, tuple or dict where it wants a tensor (samples returning Python lists), images with their
    channels last or none, images not flattened for a ``Linear``, or a dtype other than its parameters'
    (NumPy's float64, uint8 pixels). ``None`` when the inputs look right: then it is the model's own error.
    ``own_call``: the user's ``model_fn`` called the model (then how it is called is not ours to say)."""
    first = _first_line(exc)
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


_CHANNELS = re.compile(r"expected input\[([\d, ]+)\] to have (\d+) channels, but got (\d+) channels")


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


_MATMUL = re.compile(r"mat1 and mat2 shapes cannot be multiplied \((\d+)x(\d+) and (\d+)x(\d+)\)")


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
                    f"({_first_line(exc)}): return each as its class index, an integer (classes = "
                    f"sorted(set(names)); classes.index(name))")
        fix = (": return each target as a number or a tensor from __getitem__, not a Python list"
               if isinstance(y, (list, tuple)) else "")
        return (f"the loss cannot take the model's output {_shape(y_pred)} and {where}'s targets "
                f"{_shape(y) if tensor else f'({_shape(y)})'}: {_first_line(exc)}{fix}")
    return None


def pixel_scale(x: Any, name: str) -> str | None:
    """A line when image-shaped float inputs ([N, C, H, W] or [N, H, W]) are raw pixels (whole numbers
    up to 255, some past 31: never scaled) or pixels scaled twice (multiples of 1/255**2, all below 1/255)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 3 or x.numel() == 0:
        return None
    x = x.detach().double()
    low, high = x.min().item(), x.max().item()
    if low < 0 or high <= 0:
        return None
    if 31 < high <= 255 and torch.equal(x, x.round()):  # (small whole numbers: a board game's planes, counts)
        return (f"The {name} set's inputs look like raw pixels (whole numbers from {low:.0f} to {high:.0f}): a network "
                f"trains poorly on that range; scale them (x / 255, or torchvision's ToTensor()), and normalise")
    twice = x * 255**2
    if high <= 1 / 255 + 1e-9 and torch.allclose(twice, twice.round(), atol=1e-3):
        return (f"The {name} set's inputs range from {low:.2g} to {high:.2g}, pixels divided by 255 twice (ToTensor() "
                f"already scales to [0, 1]): divide once")
    return None


def class_balance(labels: Any, name: str = "training") -> str | None:
    """A line when a set's class labels are imbalanced (the most common class at least 5 times the
    least common one present), naming both and the ``sample_weights`` that draws them evenly."""
    try:
        y = torch.as_tensor(labels).flatten()
    except (TypeError, ValueError, RuntimeError):
        return None
    if y.numel() == 0 or y.is_floating_point() or y.dtype == torch.bool or y.min() < 0:
        return None
    counts = torch.bincount(y.long().cpu())
    present = counts[counts > 0]
    if len(present) < 2 or present.max() < 5 * present.min():
        return None
    big, small = int(counts.argmax()), int(torch.where(counts > 0, counts, counts.max() + 1).argmin())
    n, most = int(counts[big]), counts[big] / y.numel()
    return (f"The {name} set's classes are imbalanced: class {big} has {n} samples ({most:.1%}), class {small} "
            f"{int(counts[small])} (a model always answering {big} is {most:.1%} right): fit(..., "
            f"sample_weights=(1 / torch.bincount(y).double())[y]) draws every class equally often")


def probability_outputs(y_pred: Any, loss_fn: Callable) -> str | None:
    """A line when a classifier's outputs are probabilities (every row in [0, 1], summing to 1: a final
    ``Softmax``) but the loss wants logits (cross-entropy) or log-probabilities (NLL); ``None`` otherwise."""
    if not isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)) or not isinstance(y_pred, torch.Tensor) or \
            y_pred.dim() < 2 or y_pred.shape[1] < 2:  # fmt: skip
        return None
    p = y_pred.detach().float()
    if p.min() < 0 or p.max() > 1 or not torch.allclose(p.sum(1), torch.ones((), device=p.device), atol=1e-3):
        return None
    start = f"The model's outputs are probabilities (each sums to 1 over its {p.shape[1]} classes), but "
    if isinstance(loss_fn, nn.NLLLoss):
        return start + "NLLLoss takes log-probabilities: end the model with LogSoftmax, not Softmax"
    return (start + "CrossEntropyLoss takes logits (it applies log-softmax itself): remove the model's final "
            "Softmax, or it learns slowly and its loss cannot fall near 0")


def unregistered(model: nn.Module) -> list[str]:
    """Lines for what a model holds where PyTorch does not see it: modules in a plain Python list, tuple
    or dict attribute (not in the model's tree: not trained, saved or moved with it), and tensors that
    require grad but are not ``nn.Parameter`` s. Empty when there is nothing to say."""
    known = {id(m) for m in model.modules()}
    lines = []
    for prefix, module in model.named_modules():
        for attr, value in vars(module).items():
            where = f"{prefix}.{attr}" if prefix else attr
            items = list(value.values()) if isinstance(value, dict) else value if isinstance(value, (list, tuple)) \
                else ()  # fmt: skip
            loose = [m for m in items if isinstance(m, nn.Module) and id(m) not in known]
            if loose and not attr.startswith("_"):
                kind, fix = type(value).__name__, "nn.ModuleDict" if isinstance(value, dict) else "nn.ModuleList"
                count = "1 module" if len(loose) == 1 else f"{len(loose)} modules"
                lines.append(f"The model's {where!r} is a Python {kind} of {count} that PyTorch does not see: their "
                             f"parameters are not trained, saved or moved to the device; make it {fix}, unless "
                             f"they are kept out on purpose")
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.requires_grad:
                lines.append(f"The model's {where!r} is a tensor that requires grad but is not an nn.Parameter: the "
                             f"optimizer does not train it and checkpoints do not save it; make it "
                             f"nn.Parameter(...)")
    return lines


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``model`` holds a BatchNorm layer (in training it needs more than one value per channel)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


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
) -> int | None:
    """One forward of ``batch`` in eval mode, then :func:`diagnose`: a :class:`ConfigError` naming
    ``name`` for the first mismatch. ``all_targets`` (a set held as tensors): every label is checked.
    ``log``: what is odd but not wrong is said there (outputs that are already probabilities).
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
            raise ConfigError(f"the {name} set's samples cannot be stacked into a batch ({_first_line(exc)}): make "
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
