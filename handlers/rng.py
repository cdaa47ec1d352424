"""The random-number state of the process, saved in checkpoints so a resumed run is the same run."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["RNGState", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and CUDA) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class RNGState:
    """``state_dict()`` holds torch's CPU generator, the run's CUDA device's (``cuda_device``; none for a
    run off CUDA, which then never starts CUDA here), Python's and NumPy's generator states.

    All values are tensors, numbers or tuples, so ``torch.load(..., weights_only=True)`` reads them.
    A state saved on CUDA restores on a CPU run (its CUDA part unused) and the other way round (the
    CUDA generator then keeps the seed it has).
    """

    def __init__(self, cuda_device: torch.device | None = None) -> None:
        if cuda_device is not None and torch.device(cuda_device).type != "cuda":
            raise ValueError(f"cuda_device must be a CUDA device or None, got {cuda_device}")
        self.cuda_device = torch.device(cuda_device) if cuda_device is not None else None

    def state_dict(self) -> dict[str, Any]:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        }
        if self.cuda_device is not None:
            state["cuda"] = torch.cuda.get_rng_state(self.cuda_device)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        saved = state.get("cuda")
        if saved is not None and self.cuda_device is not None:
            if isinstance(saved, (list, tuple)):  # files before the run's own device was known: every GPU's
                index = self.cuda_device.index or 0
                saved = saved[index] if index < len(saved) else None
            if saved is not None:
                torch.cuda.set_rng_state(saved, self.cuda_device)
