"""The data route: which path each set takes (tensors held in memory, a map-style ``Dataset`` through a
``DataLoader``, a stream), and the loaders built for it, alike for training, validation, ``evaluate``
and ``predict`` (Keras's data adapters: one dispatch, one builder per kind of data)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import ignite.distributed as idist
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset

from engine import ConfigError, InMemoryLoader, ResumableRandomSampler, RunSettings, param
from engine.device import available_memory
from engine.seeding import SeededDataset
from engine.stream import StreamLoader, WorkerShardCheck, is_stateful_stream, make_stream_loader
from handlers.adapters import stream_progress
from handlers.console import write_line

__all__ = ["Data", "data_route", "data_route_of", "eval_loader", "labels_of", "make_loaders", "read_into_memory"]


Data = Dataset | tuple[torch.Tensor, torch.Tensor]


def _empty(name: str) -> ConfigError:
    """The one error for a set with no sample, whichever path finds it."""
    return ConfigError(f"the {name} set is empty: there is nothing to train or evaluate on")


def _tensor_pair(data: Any, name: str = "training") -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(inputs, targets)`` when ``data`` is held as tensors (a pair, or a two-tensor ``TensorDataset``),
    checked on every path: equal lengths, not empty."""
    if isinstance(data, (tuple, list)):
        if len(data) != 2 or not all(isinstance(t, torch.Tensor) for t in data):
            numpy = any(type(t).__module__ == "numpy" for t in data)
            raise ConfigError(f"the {name} data must be a Dataset, an IterableDataset or a pair of tensors "
                              f"(inputs, targets)" + (": convert NumPy arrays with torch.from_numpy" if numpy else ""))
        x, y = data
    elif isinstance(data, TensorDataset) and len(data.tensors) == 2:
        x, y = data.tensors
    else:
        return None
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
        raise ConfigError(f"the {name} set's inputs and targets differ in length: {len(x) if x.dim() else 0} inputs, "
                          f"{len(y) if y.dim() else 0} targets")
    if x.shape[0] == 0:
        raise _empty(name)
    return x, y


def _check_not_empty(data: Any, name: str) -> None:
    """A map-style set with no sample: one line now, not an error deep inside the first epoch."""
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__"):
        if len(data) == 0:
            raise _empty(name)


def _not_data(data: Any, name: str) -> str:
    """Why ``data`` (neither a ``Dataset`` nor a pair of tensors) cannot be a set, and what to pass."""
    if isinstance(data, DataLoader):
        return (f"the {name} data is a DataLoader: pass its dataset (loader.dataset) instead; fit builds the loader "
                f"itself, from {param('batch_size')} and {param('num_workers')}, with the sampler that makes a resume "
                f"exact (a collate_fn goes to fit(collate_fn=...))")
    if data is None:
        return (f"no {name} data was given (None): fit validates every epoch; pass a held-out set "
                f"(torch.utils.data.random_split cuts one from the training set)")
    return (f"the {name} data is a {type(data).__name__}: pass a Dataset, an IterableDataset or a pair of tensors "
            f"(inputs, targets)")


def data_route(data: Data, data_path: str, name: str = "training") -> str:
    """Which path ``data`` takes: ``memory`` (tensors on the device, sliced into batches), ``loader``
    (a ``DataLoader`` over a map-style ``Dataset``) or ``stream`` (a ``DataLoader`` over an
    ``IterableDataset``). ``auto`` follows the data: tensors to memory, any other ``Dataset`` to a loader."""
    if isinstance(data, IterableDataset):
        if data_path == "memory":
            raise ConfigError(f"a stream (IterableDataset) cannot be read into memory: "
                              f"use {param('data_path', 'auto')}")
        return "stream"
    if not isinstance(data, Dataset):
        if _tensor_pair(data, name) is None:  # raises for a tuple or list that is not a pair of tensors
            raise ConfigError(_not_data(data, name))
        return "memory" if data_path in ("auto", "memory") else "loader"
    if data_path == "auto":
        return "memory" if _tensor_pair(data, name) is not None else "loader"
    return data_path


def data_route_of(loader: Any) -> str:
    """The route a training loader takes (as :func:`data_route` names it): ``memory`` for an
    ``InMemoryLoader``, ``stream`` for a ``StreamLoader``, ``loader`` for anything else (a ``DataLoader``)."""
    if isinstance(loader, InMemoryLoader):
        return "memory"
    return "stream" if isinstance(loader, StreamLoader) else "loader"


def _nbytes(value: Any) -> int:
    t = torch.as_tensor(value)
    return t.nelement() * t.element_size()


def read_into_memory(data: Dataset, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ``(input, target)`` sample of ``data`` stacked into two tensors, once; refused in one line
    (a :class:`ConfigError`) when they would not fit in the memory of ``device`` (and of the machine,
    where they are built): their size is estimated from the first sample first."""
    n = len(data)
    if n == 0:
        raise _empty(name)
    first = data[0]
    if not isinstance(first, (tuple, list)) or len(first) != 2:
        raise ConfigError(f"the {name} set's samples are {type(first).__name__}s, not (input, target) pairs: "
                          f"only those can be read into memory; use {param('data_path', 'loader')}")
    need = (_nbytes(first[0]) + _nbytes(first[1])) * n
    places = [torch.device("cpu")] + ([device] if device.type != "cpu" else [])
    for place in places:
        free = available_memory(place)
        if need > 0.8 * free:
            where = "this machine's RAM" if place.type == "cpu" else f"{place}"
            raise ConfigError(f"the {name} set would take about {_size(need)} in memory ({n} samples like the first), "
                              f"more than {where} has free ({_size(free)}): use {param('data_path', 'loader')} "
                              f"(or {param('data_path', 'auto')}) to read it batch by batch")
    write_line(f"Reading the {name} set into memory ({n} samples, {_size(need)}): random transforms in its "
               f"__getitem__ are drawn once, not every epoch ({param('data_path', 'loader')} draws them afresh)")
    x0, y0 = torch.as_tensor(first[0]), torch.as_tensor(first[1])
    x, y = torch.empty((n, *x0.shape), dtype=x0.dtype), torch.empty((n, *y0.shape), dtype=y0.dtype)
    x[0], y[0] = x0, y0
    for i in range(1, n):
        xi, yi = data[i]
        x[i], y[i] = torch.as_tensor(xi), torch.as_tensor(yi)
    return x, y


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} TB"


def make_loaders(train: Data, val: Data, settings: RunSettings, device: torch.device,
                 collate_fn: Callable[[list], Any] | None = None, drop_lone_last: bool = False,
                 sample_weights: Any = None) -> tuple[Any, Any]:
    """The training and validation loaders this process iterates, each on the path its data takes
    (:func:`data_route`):

    - ``memory``: an ``InMemoryLoader`` over tensors on ``device`` (a ``Dataset`` asked there with
      ``data_path="memory"`` is read once, if it fits);
    - ``loader``: a ``DataLoader`` with a keyed ``ResumableRandomSampler`` over a
      :class:`~engine.seeding.SeededDataset`: random transforms in ``__getitem__`` are drawn afresh
      each epoch, from ``(seed, epoch, batch)``, the same with any number of workers and after a resume;
    - ``stream``: a :class:`~engine.stream.StreamLoader` over torchdata's ``StatefulDataLoader``; an
      epoch is one pass, or ``settings.epoch_length`` batches.

    Either way the order is seeded by ``settings.seed``, resumes exactly, and in a distributed run
    each process gets its shard (``batch_size`` is global; a stream shards itself by rank).
    ``collate_fn(samples) -> batch`` makes each batch of both sets on the loader and stream paths; with
    it, ``data_path="auto"`` sends tensors there too (a set held in memory is sliced, not collated).
    ``drop_lone_last`` (a model with BatchNorm, which cannot train on one sample): an epoch's last
    training batch that would hold a single sample is left out, and the run says so in one line.
    ``sample_weights`` (one per training sample): each epoch draws as many samples with replacement,
    in proportion, instead of a permutation (memory and loader paths; not a stream).
    """
    rank, world = idist.get_rank(), idist.get_world_size()
    if settings.batch_size % world:
        raise ConfigError(f"{param('batch_size')} {settings.batch_size} is global: it must divide among "
                          f"{world} processes")
    kw = dict(num_workers=settings.num_workers, pin_memory=device.type == "cuda",
              persistent_workers=settings.num_workers > 0)
    settings = _with_collate(settings, kw, collate_fn)
    route = data_route(train, settings.data_path)
    _check_not_empty(train, "training")
    if sample_weights is not None and route == "stream":
        raise ConfigError("sample_weights need a set with a length, one weight per sample; a stream "
                          "(IterableDataset) is read in its own order: weight or repeat its items in __iter__")
    if settings.epoch_length is not None and route != "stream":
        raise ConfigError(f"{param('epoch_length')} is for streams (an IterableDataset); to train on part of each "
                          f"epoch use {param('limit_train_batches')}")
    shard = _Shard(settings.batch_size // world, rank, world)
    build = {"memory": _train_in_memory, "loader": _train_dataloader, "stream": _train_stream}[route]
    train_loader = build(train, settings, device, shard, kw, drop_lone_last, sample_weights)
    return train_loader, _val_loader(val, settings, device, rank, world, kw)


@dataclasses.dataclass(frozen=True)
class _Shard:
    """This process's part of a global batch: its size, the process's rank and the number of processes."""

    batch: int
    rank: int
    world: int


def _train_in_memory(train: Data, settings: RunSettings, device: torch.device, shard: _Shard, kw: dict,
                     drop_lone_last: bool, sample_weights: Any) -> InMemoryLoader:  # fmt: skip
    """Tensors on ``device`` sliced into batches (a ``Dataset`` read into them first, if it fits)."""
    x, y = _tensor_pair(train, "training") or read_into_memory(train, "training", device)
    limit = settings.limit_train_batches
    loader = InMemoryLoader(x, y, shard.batch, shuffle=True, seed=settings.seed, device=device, max_batches=limit,
                            rank=shard.rank, world_size=shard.world, weights=sample_weights)
    loader.drop_last = drop_lone_last and _lone_last(loader.num_samples, shard.batch, limit)
    return loader


def _train_dataloader(train: Data, settings: RunSettings, device: torch.device, shard: _Shard, kw: dict,
                      drop_lone_last: bool, sample_weights: Any) -> DataLoader:  # fmt: skip
    """A ``DataLoader`` with a keyed :class:`ResumableRandomSampler` over a :class:`SeededDataset`."""
    pair = _tensor_pair(train, "training")
    train_set = TensorDataset(*pair) if pair is not None and not isinstance(train, Dataset) else train
    limit, batch, seed = settings.limit_train_batches, shard.batch, settings.seed
    sampler = ResumableRandomSampler(len(train_set), seed=seed, max_samples=limit * batch if limit else None,
                                     rank=shard.rank, world_size=shard.world, keyed=True, weights=sample_weights)
    return DataLoader(SeededDataset(train_set, seed), batch_size=batch, sampler=sampler,
                      generator=torch.Generator().manual_seed(seed),
                      drop_last=drop_lone_last and _lone_last(len(sampler), batch, None), **kw)


def _train_stream(train: Data, settings: RunSettings, device: torch.device, shard: _Shard, kw: dict,
                  drop_lone_last: bool, sample_weights: Any) -> StreamLoader:  # fmt: skip
    """torchdata's ``StatefulDataLoader`` over the stream; an epoch is a pass, or ``epoch_length`` batches."""
    lengths = [n for n in (settings.epoch_length, settings.limit_train_batches) if n]
    loader = make_stream_loader(train, shard.batch, generator=torch.Generator().manual_seed(settings.seed), **kw)
    stream = StreamLoader(loader, epoch_length=min(lengths, default=None),
                          on_resume=None if is_stateful_stream(train) else _say_read_again,
                          on_lone_batch=_say_lone_once(shard.batch) if drop_lone_last else None)
    if settings.save_every_iters and not is_stateful_stream(train):
        write_line("The training stream has no state_dict: a resume mid-epoch reads again the batches that epoch "
                   "had consumed (exact when the stream yields the same items again)")
    return stream


def labels_of(loader: Any) -> Any:
    """Every class label of a training set, where it is known without reading the samples: tensors
    held in memory, or a dataset's ``targets`` (torchvision's sets keep them there); else ``None``."""
    if isinstance(loader, InMemoryLoader):
        return loader.y
    dataset = getattr(loader, "dataset", None)
    targets = getattr(dataset, "targets", None) if dataset is not None else None
    if isinstance(targets, (list, torch.Tensor)) and len(targets) == len(dataset):
        return targets
    return None


def _with_collate(settings: RunSettings, kw: dict, collate_fn: Callable[[list], Any] | None) -> RunSettings:
    """``collate_fn`` into the loaders' ``kw``; the settings with tensors sent down the loader path."""
    if collate_fn is None:
        return settings
    if settings.data_path == "memory":
        raise ConfigError(f"a collate_fn makes batches on the loader path; {param('data_path', 'memory')} slices "
                          f"tensors instead: use {param('data_path', 'auto')} or {param('data_path', 'loader')}")
    kw["collate_fn"] = collate_fn
    return dataclasses.replace(settings, data_path="loader")  # a stream stays a stream


def _lone_last(samples: int, batch: int, max_batches: int | None) -> bool:
    """Whether an epoch of ``samples`` in batches of ``batch`` ends in a batch of one (then said, in a line)."""
    lone = samples % batch == 1 and batch > 1 and (max_batches is None or max_batches > samples // batch)
    if lone:
        each = " a process" if idist.get_world_size() > 1 else ""
        write_line(f"The training set's last batch would hold 1 sample ({samples} samples{each} in batches of "
                   f"{batch}), which BatchNorm cannot train on: it is left out each epoch (a different sample each "
                   f"time, in the new order)")
    return lone


def _say_lone_once(batch: int) -> Callable[[], None]:
    """What a stream calls when it leaves out a batch of one sample: one line, the first time."""
    said = []

    def say() -> None:
        if not said:
            said.append(True)
            write_line(f"The training stream's pass ended in a batch of 1 sample (batches of {batch}), which "
                       f"BatchNorm cannot train on: it is left out (and any such batch after it)")
    return say


def _say_read_again(loader_state: Mapping[str, Any]) -> None:
    """On a resume mid-pass of a stream without state: one line saying it is read again up to there."""
    consumed, finished = stream_progress(loader_state)
    if consumed and not finished:
        write_line(f"The stream has no state_dict: reading again the {consumed} batch(es) of this pass it had "
                   f"consumed, to continue where it stopped")


def _val_loader(val: Data, settings: RunSettings, device: torch.device, rank: int, world: int, kw: dict,
                name: str = "validation") -> Any:  # fmt: skip
    route = data_route(val, settings.data_path, name)
    _check_not_empty(val, name)
    pair = _tensor_pair(val, name)
    keep = settings.limit_val_batches and settings.limit_val_batches * settings.val_batch_size  # samples, global
    if route == "memory":
        vx, vy = pair or read_into_memory(val, name, device)
        return InMemoryLoader(vx[:keep or None], vy[:keep or None], settings.val_batch_size, shuffle=False,
                              device=device, rank=rank, world_size=world)
    order = torch.Generator().manual_seed(settings.seed)  # not the global RNG: the model's dropout draws from it
    if route == "stream":
        stream: Any = DataLoader(val, batch_size=settings.val_batch_size, generator=order, **kw)
        if settings.num_workers > 1:
            stream = WorkerShardCheck(stream, name)
        return _FirstBatches(stream, settings.limit_val_batches) if keep else stream
    val_set = SeededDataset(val if isinstance(val, Dataset) else TensorDataset(*pair), settings.seed)
    if keep and keep < len(val_set):
        val_set = Subset(val_set, range(keep))
    if world > 1:
        val_set = Subset(val_set, range(rank, len(val_set), world))
    return DataLoader(val_set, batch_size=settings.val_batch_size, shuffle=False, generator=order, **kw)


def eval_loader(data: Data, settings: RunSettings, device: torch.device,
                collate_fn: Callable[[list], Any] | None = None, name: str = "test") -> Any:  # fmt: skip
    """A loader of ``data`` (tensors, a ``Dataset`` or a stream) as the validation's is made: the stored
    order, batches of ``settings.val_batch_size``, this process's shard; named ``name`` in errors."""
    workers = settings.num_workers
    kw: dict[str, Any] = dict(num_workers=workers, pin_memory=device.type == "cuda")
    settings = _with_collate(settings, kw, collate_fn)
    return _val_loader(data, settings, device, idist.get_rank(), idist.get_world_size(), kw, name)


class _FirstBatches:
    """The first ``n`` batches of a loader, afresh at each pass (a validation stream cut short)."""

    def __init__(self, loader: Iterable, n: int) -> None:
        self.loader, self.n = loader, n

    def __iter__(self) -> Iterator:
        return itertools.islice(iter(self.loader), self.n)
