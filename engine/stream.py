"""Streams: an ``IterableDataset`` through torchdata's ``StatefulDataLoader``, epochs cut from it, and
its place saved in checkpoints."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import IterableDataset

from engine.batch import tensors_in
from engine.errors import ConfigError, param

__all__ = ["StreamLoader", "WorkerShardCheck", "is_stateful_stream", "make_stream_loader", "sharded_batches"]


def is_stateful_stream(dataset: IterableDataset) -> bool:
    """Whether the stream keeps its own position (``state_dict``/``load_state_dict``)."""
    return callable(getattr(dataset, "state_dict", None)) and callable(getattr(dataset, "load_state_dict", None))


def make_stream_loader(dataset: IterableDataset, batch_size: int, **kwargs: Any) -> Any:
    """torchdata's ``StatefulDataLoader`` over ``dataset``: a ``DataLoader`` whose ``state_dict()`` says
    how many batches it handed out, with each worker's stream position (the dataset's ``state_dict``, or
    else a count of items to skip again on resume)."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    logging.getLogger("torchdata.stateful_dataloader.stateful_dataloader").setLevel(logging.ERROR)  # we say it
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return StatefulDataLoader(dataset, batch_size=batch_size, **kwargs)


def sharded_batches(batches: Iterable[Any], workers: int, name: str) -> Iterator[Any]:
    """``batches`` (of a stream read by ``workers`` DataLoader workers), as they come; a :class:`ConfigError`
    instead of the second if it equals the first. A ``DataLoader`` takes its batches from the workers in
    turn, and every worker runs the stream's ``__iter__``: one that does not shard itself by
    ``get_worker_info()`` gives each worker the same items, so the first two batches are equal and every
    sample would be trained on ``workers`` times an epoch. (A stream whose workers draw different random
    augmentations of the same items is not caught.)"""
    iterator = iter(batches)
    if workers < 2:
        yield from iterator
        return
    first = next(iterator, None)
    if first is None:
        return
    kept = [t.clone() for t in tensors_in(first)]  # the step may change the batch in place
    yield first
    second = next(iterator, None)
    if second is None:
        return
    now = tensors_in(second)
    if kept and len(now) == len(kept) and all(_equal(a, b) for a, b in zip(kept, now)):
        raise ConfigError(f"the {name} stream gives each of its {workers} DataLoader workers the same items (its "
                          f"first two batches are equal, one from each worker): shard it in __iter__ by "
                          f"torch.utils.data.get_worker_info() (worker id of num_workers takes every num_workers-th "
                          f"item), or use {param('num_workers', 0)}")
    yield second
    yield from iterator


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b.to(a.device))


class WorkerShardCheck:
    """A validation stream's loader, each pass through :func:`sharded_batches`."""

    def __init__(self, loader: Any, name: str = "validation") -> None:
        self.loader, self.name = loader, name

    def __iter__(self) -> Iterator[Any]:
        return sharded_batches(self.loader, getattr(self.loader, "num_workers", 0), self.name)


class StreamLoader:
    """The training loader of a stream: each epoch is one pass over ``loader`` or, with
    ``epoch_length``, that many batches, the next epoch going on where the last stopped (a new pass
    begins when one ends).

    ``state_dict()`` is the loader's: where the trainer stands in the current pass. A stream with
    its own ``state_dict`` resumes mid-epoch from that position; one without is skipped forward
    again over the batches the epoch had consumed (exact when the stream yields the same items again).
    Without ``epoch_length`` the length of an epoch is unknown until the first pass ends (``len()``
    raises ``TypeError``, as a ``DataLoader`` over a stream does). ``on_resume(loader_state)`` is
    called after a state is loaded (the run says there when a stream is read again). With
    ``on_lone_batch`` (a model with BatchNorm, which cannot train on one sample), a batch of one sample
    (a worker's pass ending one past a whole batch) is left out, and ``on_lone_batch()`` called.
    """

    def __init__(self, loader: Any, epoch_length: int | None = None,
                 on_resume: Callable[[Mapping[str, Any]], None] | None = None,
                 on_lone_batch: Callable[[], None] | None = None) -> None:  # fmt: skip
        if epoch_length is not None and (not isinstance(epoch_length, int) or epoch_length < 1):
            raise ConfigError(f"{param('epoch_length')} must be a positive integer, got {epoch_length!r}")
        self.loader = loader
        self.epoch_length = epoch_length
        self.dataset = loader.dataset
        self.batch_size = loader.batch_size
        self.on_resume = on_resume
        self.on_lone_batch = on_lone_batch

    def _batches(self) -> Iterator[Any]:
        """One pass over the loader, through :func:`sharded_batches`, lone batches left out if asked."""
        batches = sharded_batches(self.loader, getattr(self.loader, "num_workers", 0), "training")
        if self.on_lone_batch is None or not self.batch_size or self.batch_size < 2:
            yield from batches
            return
        for batch in batches:
            tensors = tensors_in(batch)
            if tensors and tensors[0].dim() > 0 and len(tensors[0]) == 1:
                self.on_lone_batch()
                continue
            yield batch

    def __len__(self) -> int:
        if self.epoch_length is None:
            raise TypeError("a stream's epoch has no length until its first pass ends")
        return self.epoch_length

    def __iter__(self) -> Iterator[Any]:
        if self.epoch_length is None:
            yield from self._batches()
            return
        empty_passes = 0
        while True:  # Ignite cuts the epochs; the next one goes on with this generator
            empty_passes += 1
            for batch in self._batches():
                empty_passes = 0
                yield batch
            if empty_passes > 1:  # (one empty pass: a resume at the very end of a pass)
                raise ConfigError("the training stream yielded no batch: its __iter__ ended at once")

    def state_dict(self) -> dict[str, Any]:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "loader" not in state:
            raise ConfigError("stream state lacks 'loader'")
        self.loader.load_state_dict(state["loader"])
        if self.on_resume is not None:
            self.on_resume(state["loader"])
