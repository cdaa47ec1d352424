"""The in-memory data path: a data set held as tensors on the device, sliced into batches."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from engine.errors import ConfigError
from engine.sampler import checked_weights, draw_order

__all__ = ["InMemoryLoader"]


# batches gathered by one index_select: up to this many, and up to this many bytes (in cache while they are used)
_CHUNK_BATCHES = 32
_CHUNK_BYTES = 1 << 20


class InMemoryLoader:
    """Yields ``(x, y)`` batches sliced by index from tensors that live on the target device.

    No workers, no per-sample Python: one ``index_select`` of inputs and one of targets gathers the
    next batches, up to 32 of them and 1 MiB (a small model's step then pays a gather a chunk, not
    two a batch; a GPU, two launches); each batch is a slice of that chunk. The order comes from the
    loader's own ``torch.Generator`` (seeded by ``seed``), so it does not depend on the global RNG,
    and ``state_dict()`` (epoch, position, generator state) lets a run continue mid-epoch exactly.

    Sharding: every rank draws the same permutation and takes ``perm[rank::world_size]``. With
    ``equal_shards`` (default: when shuffling, i.e. training) the permutation is first cut to a
    multiple of ``world_size``, so every rank runs the same number of steps; without it
    (evaluation) every sample is seen by exactly one rank, none twice and none padded.

    Args:
        x: inputs, first dimension = samples (normalise them once, before).
        y: targets, same first dimension.
        batch_size: samples per batch on this rank.
        shuffle: a new permutation each epoch; else the stored order.
        drop_last: drop the last short batch of each epoch.
        equal_shards: cut to a multiple of ``world_size`` (default: ``shuffle``).
        seed: seed of the order.
        device: where to hold the tensors (default: where they are).
        max_batches: cap on batches per epoch (``None``: all).
        rank: this process's index among ``world_size``.
        world_size: the number of processes the data is sharded over.
        weights: one per sample (with ``shuffle``): each epoch draws as many samples with replacement,
            in proportion (see :func:`engine.sampler.draw_order`).
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        equal_shards: bool | None = None,
        seed: int = 0,
        device: str | torch.device | None = None,
        max_batches: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        weights: Any = None,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if x.shape[0] != y.shape[0]:
            raise ConfigError(f"inputs and targets differ in length: {x.shape[0]} vs {y.shape[0]}")
        if x.shape[0] == 0:
            raise ConfigError("the data set is empty: there is nothing to train or evaluate on")
        if max_batches is not None and (not isinstance(max_batches, int) or max_batches < 1):
            raise ConfigError(f"max_batches must be a positive integer or None, got {max_batches!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is not in a world of size {world_size}")
        if x.shape[0] < world_size:
            raise ConfigError(f"{x.shape[0]} samples cannot be shared among {world_size} processes")
        self.x = x.to(device) if device is not None else x
        self.y = y.to(device) if device is not None else y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.equal_shards = shuffle if equal_shards is None else equal_shards
        self.seed = seed
        self.max_batches = max_batches
        self.rank = rank
        self.world_size = world_size
        self.weights = None if weights is None else checked_weights(weights, x.shape[0])
        if self.weights is not None and not shuffle:
            raise ConfigError("weights draw a random order: they need shuffle=True")
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0  # epochs begun
        self.position = 0  # batches handed out in the current epoch
        self._epoch_rng: torch.Tensor | None = None  # generator state at the start of the current epoch
        self._indices: torch.Tensor | None = None

    @property
    def num_samples(self) -> int:
        """Samples this rank sees per (uncapped) epoch."""
        n = self.x.shape[0]
        if self.equal_shards:
            return n // self.world_size
        return len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        n = self.num_samples
        batches = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        if self.max_batches is not None:
            batches = min(batches, self.max_batches)
        return batches

    def _draw_indices(self) -> torch.Tensor:
        n = self.x.shape[0]
        if self.shuffle:
            order = draw_order(n, self.generator, self.weights)
        else:
            order = torch.arange(n)
        if self.equal_shards:
            order = order[: n - n % self.world_size]
        order = order[self.rank :: self.world_size]
        return order.to(self.x.device)

    def _begin_epoch(self) -> None:
        self._epoch_rng = self.generator.get_state()
        self._indices = self._draw_indices()
        self.epoch += 1
        self.position = 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._indices is None or self.position >= len(self):
            self._begin_epoch()
        indices, bs, length = self._indices, self.batch_size, len(self)
        row_bytes = (self.x[:1].nbytes + self.y[:1].nbytes) or 1
        chunk = max(1, min(_CHUNK_BATCHES, _CHUNK_BYTES // (row_bytes * bs)))
        while self.position < length:
            first = self.position
            last = min(first + chunk, length)
            idx = indices[first * bs : last * bs]
            xs, ys = self.x.index_select(0, idx), self.y.index_select(0, idx)
            for i in range(last - first):
                self.position += 1
                yield xs[i * bs : (i + 1) * bs], ys[i * bs : (i + 1) * bs]

    def state_dict(self) -> dict[str, Any]:
        """Where the loader stands: epochs begun, batches handed out in this one, and the order's RNG."""
        rng = self._epoch_rng if self._epoch_rng is not None else self.generator.get_state()
        return {"epoch": self.epoch, "position": self.position, "epoch_rng": rng.clone(), "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state``: the same remaining batches in the same order."""
        missing = {"epoch", "position", "epoch_rng"} - set(state)
        if missing:
            raise ConfigError(f"loader state lacks {sorted(missing)}")
        self.generator.set_state(state["epoch_rng"])
        if state["epoch"] == 0:
            self.epoch, self.position, self._indices, self._epoch_rng = 0, 0, None, None
            return
        self._epoch_rng = self.generator.get_state()
        self._indices = self._draw_indices()
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
