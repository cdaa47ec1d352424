"""Random draws that are a function of (run seed, epoch, sample or batch), not of the process or the
worker that makes them: what makes augmentation resume exactly with any number of DataLoader workers."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

__all__ = ["SeededDataset", "batch_generator", "mix_seed"]

_MASK = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from integers (SplitMix64 over each): neighbouring epochs and indices
    give unrelated streams. Pure Python, about a microsecond."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK)) * 0xBF58476D1CE4E5B9 & _MASK
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK
        h ^= h >> 31
    return h >> 1


def batch_generator(seed: int, epoch: int, iteration: int, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded from ``(seed, epoch, iteration)``: the draws of a batch
    transform, the same again after a resume with nothing saved."""
    return torch.Generator(device=device).manual_seed(mix_seed(seed, epoch, iteration))


class SeededDataset(Dataset):
    """Wraps a map-style ``Dataset`` so that the random draws of its ``__getitem__`` (torch's,
    Python's and NumPy's global generators) are a function of ``(seed, epoch, batch)``.

    Keys are ``(epoch, index)`` (what a keyed :class:`~engine.sampler.ResumableRandomSampler` yields)
    or a plain ``index`` (evaluation: the same draws every time). A ``DataLoader`` fetches a batch
    with one ``__getitems__`` call: the generators are seeded once from ``(seed, epoch, first index,
    size)`` and the batch's samples draw in order, so which worker fetches a batch, and how many it
    fetched before, changes nothing. In the main process (``num_workers=0``) the generators are put
    back afterwards: the model's own randomness (dropout) does not depend on the data's. Only torch's
    CPU generator is seeded: transforms in ``__getitem__`` run on the CPU. ``fetch_seconds``: the
    time spent fetching in this process (the main one's is the training's wait when ``num_workers=0``).
    """

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.fetch_seconds = 0.0

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # the user's attributes (classes, targets, ...) stay reachable
        if name in ("dataset", "seed", "fetch_seconds") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list) -> list:
        epoch, first = keys[0] if isinstance(keys[0], tuple) else (-1, keys[0])
        indices = [k[1] for k in keys] if isinstance(keys[0], tuple) else list(keys)
        start = time.perf_counter()
        try:
            with _seeded(mix_seed(self.seed, epoch, first, len(indices))):
                many = getattr(self.dataset, "__getitems__", None)
                return list(many(indices)) if callable(many) else [self.dataset[i] for i in indices]
        finally:
            self.fetch_seconds += time.perf_counter() - start


@contextlib.contextmanager
def seeded_globals(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Within this block torch's CPU generator (and ``device``'s, if CUDA), Python's and NumPy's are
    seeded from ``seed``; afterwards they are as they were (what a batch transform drawing from the
    global generators, as torchvision's ``v2.MixUp`` does, needs to draw the same again on resume)."""
    device = torch.device(device) if device is not None else None
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device is not None and device.type == "cuda" else []  # fmt: skip
    with torch.random.fork_rng(devices=cuda, enabled=bool(cuda)):  # the CPU's: _seeded puts it back
        if cuda:
            torch.cuda.manual_seed(seed)
        with _seeded(seed):
            yield


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Torch's CPU, Python's and NumPy's global generators seeded; in the main process, put back after."""
    if get_worker_info() is not None:  # a worker's generators are its own
        _seed_all(seed)
        yield
        return
    saved = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        _seed_all(seed)
        yield
    finally:
        torch.set_rng_state(saved[0])
        random.setstate(saved[1])
        np.random.set_state(saved[2])


def _seed_all(seed: int) -> None:
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
