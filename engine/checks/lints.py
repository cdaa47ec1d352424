"""Lints: what is odd about the data or the model but not wrong, said in one line before training
(raw pixels, imbalanced classes, probabilities fed to a loss that wants logits, modules PyTorch cannot see)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["class_balance", "has_batch_norm", "pixel_scale", "probability_outputs", "unregistered"]


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
