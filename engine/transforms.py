"""Batch transforms: random augmentation of a whole batch on its device, each sample drawn on its own.

A batch transform is ``fn(x, generator) -> x`` on a batch ``x`` of shape ``[N, C, H, W]``; every
random draw comes from ``generator``, which the trainer seeds from ``(seed, epoch, iteration)``
(:func:`engine.seeding.batch_generator`): a run resumed mid-epoch draws the same again, with nothing
saved. Unlike torchvision's v2 transforms applied to a batched tensor (one set of parameters for the
whole batch), each sample gets its own crop and its own flip, as in the CIFAR-10 speed-runs.

    fit(model, (x, y), val, settings, train_transform=Compose(RandomCrop(4), RandomHorizontalFlip()))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["BatchTransform", "Compose", "RandomCrop", "RandomHorizontalFlip"]

BatchTransform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _check_images(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} takes a batch of images [N, C, H, W], got {shape}")


class RandomCrop:
    """Pad each image by ``padding`` pixels (zeros, as torchvision's ``RandomCrop(size, padding)``) and
    cut a window of the original size at a random offset per sample: one gather for the batch."""

    def __init__(self, padding: int = 4) -> None:
        if not isinstance(padding, int) or padding < 1:
            raise ValueError(f"padding must be a positive integer, got {padding!r}")
        self.padding = padding

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        _check_images(x, "RandomCrop")
        n, c, h, w = x.shape
        p = self.padding
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n, 1), device=x.device, generator=generator)
        dx = torch.randint(0, 2 * p + 1, (n, 1), device=x.device, generator=generator)
        rows = (dy + torch.arange(h, device=x.device)).view(n, 1, h, 1)
        cols = (dx + torch.arange(w, device=x.device)).view(n, 1, 1, w)
        batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        channel = torch.arange(c, device=x.device).view(1, c, 1, 1)
        return padded[batch, channel, rows, cols]

    def __repr__(self) -> str:
        return f"RandomCrop(padding={self.padding})"


class RandomHorizontalFlip:
    """Mirror each image left-right with probability ``p``, drawn per sample."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p!r}")
        self.p = p

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        _check_images(x, "RandomHorizontalFlip")
        flip = torch.rand(x.shape[0], device=x.device, generator=generator) < self.p
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class Compose:
    """Apply batch transforms in order, all drawing from the one generator."""

    def __init__(self, *transforms: BatchTransform | Sequence[BatchTransform]) -> None:
        if len(transforms) == 1 and isinstance(transforms[0], (list, tuple)):
            transforms = tuple(transforms[0])
        for t in transforms:
            if not callable(t):
                raise TypeError(f"a batch transform must be callable, got {type(t).__name__}")
        self.transforms = tuple(transforms)

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        for t in self.transforms:
            x = t(x, generator)
        return x

    def __repr__(self) -> str:
        return f"Compose({', '.join(map(repr, self.transforms))})"
