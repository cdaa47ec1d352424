"""A shuffling sampler for ``DataLoader`` that can continue an epoch exactly where it stopped."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from ignite.engine import Engine
from torch.utils.data import Sampler

from engine.epoch import batch_in_epoch
from engine.errors import ConfigError

__all__ = ["ResumableRandomSampler", "checked_weights", "draw_order"]


def checked_weights(weights: Any, num_samples: int, name: str = "training") -> torch.Tensor:
    """``weights`` as a 1-D float64 tensor of ``num_samples`` finite, non-negative numbers, not all 0;
    a :class:`ConfigError` naming what is wrong otherwise."""
    try:
        w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"sample_weights must be numbers, one per {name} sample ({exc})") from exc
    if w.dim() != 1 or len(w) != num_samples:
        raise ConfigError(f"sample_weights must hold one number per {name} sample: {num_samples} samples, got "
                          f"{'a shape ' + str(list(w.shape)) if w.dim() != 1 else len(w)}")
    if not torch.isfinite(w).all() or (w < 0).any():
        bad = int((~torch.isfinite(w) | (w < 0)).nonzero()[0])
        raise ConfigError(f"sample_weights must be finite and >= 0: sample {bad}'s is {w[bad].item()}")
    if w.sum() <= 0:
        raise ConfigError("sample_weights are all 0: no sample could be drawn")
    return w


def draw_order(num_samples: int, generator: torch.Generator, weights: torch.Tensor | None = None) -> torch.Tensor:
    """An epoch's order: a permutation of ``num_samples`` indices or, with ``weights``, as many draws
    with replacement, sample ``i`` drawn with probability ``weights[i] / weights.sum()``."""
    if weights is None:
        return torch.randperm(num_samples, generator=generator)
    return torch.multinomial(weights, num_samples, replacement=True, generator=generator)


class ResumableRandomSampler(Sampler[int]):
    """Random order (or weighted draws) from its own ``torch.Generator`` (not the global RNG), at most
    ``max_samples`` per epoch, and a ``state_dict()`` that lets a resumed run hand out the same
    remaining indices.

    A ``DataLoader`` prefetches, so the sampler itself cannot know how many of its indices the
    *trainer* has consumed: :meth:`attach` it to the trainer (with the loader's batch size), and its
    ``state_dict()`` records the trainer's place in the epoch.

    In a distributed run every rank draws the same permutation, cut to a multiple of
    ``world_size``, and takes ``perm[rank::world_size]``: equal, disjoint shards.

    With ``keyed`` it yields ``(epoch, index)`` instead of ``index``: the key of a
    :class:`~engine.seeding.SeededDataset`, whose per-sample draws then depend on the epoch and the
    sample only (epochs count from 1, saved and restored with the order).

    Args:
        num_samples: size of the data set.
        seed: seed of the order.
        max_samples: cap per epoch on this rank (``None``: all), e.g. ``limit_batches * batch_size``.
        rank: this process's index among ``world_size``.
        world_size: the number of processes the data is sharded over.
        keyed: yield ``(epoch, index)`` pairs.
        weights: one per sample: an epoch draws ``num_samples`` indices with replacement, in proportion
            (class imbalance: ``(1 / torch.bincount(y).double())[y]``); see :func:`draw_order`.
    """

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        max_samples: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        keyed: bool = False,
        weights: Any = None,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in a world of size {world_size}")
        if num_samples < 1:
            raise ConfigError("the data set is empty: there is nothing to train on")
        if num_samples < world_size:
            raise ConfigError(f"{num_samples} samples cannot be shared among {world_size} processes")
        if max_samples is not None and max_samples < 1:
            raise ConfigError(f"max_samples must be positive, got {max_samples}")
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size
        self.max_samples = max_samples
        self.keyed = keyed
        self.weights = None if weights is None else checked_weights(weights, num_samples)
        self.epoch = 0  # orders drawn so far: the current order's epoch
        self._trainer: Engine | None = None
        self._batch_size = 1
        self.generator = torch.Generator().manual_seed(seed)
        self._epoch_rng: torch.Tensor | None = None
        self._order: torch.Tensor | None = None
        self._offset: int | None = None  # set by load_state_dict: continue the current order from here

    def __len__(self) -> int:
        shard = self.num_samples // self.world_size
        return shard if self.max_samples is None else min(shard, self.max_samples)

    def _draw(self) -> torch.Tensor:
        self.epoch += 1
        self._epoch_rng = self.generator.get_state()
        order = draw_order(self.num_samples, self.generator, self.weights)
        order = order[: self.num_samples - self.num_samples % self.world_size][self.rank :: self.world_size]
        return order[: len(self)]

    def __iter__(self) -> Iterator[int]:
        if self._offset is not None and self._order is not None:
            order, start = self._order, self._offset
        else:
            order, start = self._draw(), 0
        self._order, self._offset = order, None
        indices = order[start:].tolist()
        if self.keyed:
            epoch = self.epoch
            return ((epoch, i) for i in indices)
        return iter(indices)

    def attach(self, trainer: Engine, batch_size: int) -> ResumableRandomSampler:
        """Follow ``trainer``, whose batches hold ``batch_size`` of this sampler's indices."""
        if not isinstance(trainer, Engine):
            raise TypeError(f"trainer must be an ignite Engine, got {type(trainer).__name__}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        self._trainer, self._batch_size = trainer, batch_size
        return self

    def _position(self) -> int | None:
        """Samples of the current epoch the trainer has consumed; ``None`` at an epoch boundary."""
        done = batch_in_epoch(self._trainer.state if self._trainer is not None else None)
        return done * self._batch_size if done else None

    def state_dict(self) -> dict[str, Any]:
        position = self._position()
        return {
            "epoch_rng": (self._epoch_rng if self._epoch_rng is not None else self.generator.get_state()).clone(),
            "rng": self.generator.get_state().clone(),
            "position": position,
            "epoch": self.epoch,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = {"epoch_rng", "rng", "position"} - set(state)
        if missing:
            raise ConfigError(f"sampler state lacks {sorted(missing)}")
        epoch = int(state.get("epoch", 0))  # absent in checkpoints made before keyed sampling
        if state["position"] is None:  # at an epoch boundary: the next epoch draws a new order
            self.generator.set_state(state["rng"])
            self._order, self._offset, self.epoch = None, None, epoch
            return
        self.generator.set_state(state["epoch_rng"])
        self.epoch = max(epoch - 1, 0)
        self._order = self._draw()
        self._offset = int(state["position"])
