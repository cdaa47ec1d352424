"""``fit``: build the engines and the loaders for your model and data, attach every default handler,
resume if asked, run to the end. The one call for the common case (Keras' ``model.fit``, Lightning's
``Trainer.fit``), with the Ignite engines still there to inspect (``fit(..., handlers=[...])``).

Example:
    >>> settings = RunSettings(epochs=5, lr=1e-3, output_dir="runs/mine", resume="auto")
    >>> result = fit(MyNet(), (x_train, y_train), (x_val, y_val), settings)
    >>> result.best_path, result.exit_code
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import ignite.distributed as idist
import torch
from ignite.engine import Engine
from ignite.handlers import EMAHandler
from ignite.metrics import Accuracy, Loss, Metric
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset

from engine import (
    ConfigError,
    InMemoryLoader,
    ResumableRandomSampler,
    RunSettings,
    create_evaluator,
    create_trainer,
    param,
)
from engine.amp import measure_precisions, resolve_amp
from engine.checks import (LabelGuard, check_batch, check_first_batches, class_balance, has_batch_norm, peek_batch,
                           unregistered)
from engine.determinism import deterministic_algorithms
from engine.device import RunDevice, available_memory, returned_home, send_home
from engine.device import prepare_batch as default_prepare_batch
from engine.seeding import SeededDataset
from engine.trainer import predict
from engine.stream import StreamLoader, WorkerShardCheck, is_stateful_stream, make_stream_loader
from handlers.adapters import inductor_default_cache, stream_progress
from handlers.console import write_line
from handlers.data_wait import DataWaitHint
from handlers.lr_finder import LRFinder
from handlers.metrics import AccuracyView, SampleCount
from handlers.run import Run, RunResult, attach_run, check_output_dir, data_order, make_output_dir
from handlers.validation import Validation

__all__ = ["build_run", "compile_cache", "data_route", "fit", "make_loaders", "make_optimizer", "read_into_memory",
           "run_device", "run_placement"]

Data = Dataset | tuple[torch.Tensor, torch.Tensor]


def make_optimizer(settings: RunSettings, model: nn.Module) -> torch.optim.Optimizer:
    """``settings.optimizer`` (adam or adamw with ``settings.beta1``/``beta2``, or sgd with Nesterov
    momentum 0.9) at ``settings.lr``."""
    name, wd, betas = settings.optimizer, settings.weight_decay, (settings.beta1, settings.beta2)
    lr = 1e-3 if settings.lr == "find" else settings.lr  # the LR finder sets it
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, betas=betas, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=wd)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)


def run_placement(settings: RunSettings) -> RunDevice:
    """This process's :class:`~engine.device.RunDevice` for ``settings.device`` (in a distributed run
    on CUDA, its own GPU), made current."""
    if idist.get_world_size() > 1:
        return RunDevice.of(settings.device, local_rank=idist.get_local_rank(),
                            local_world_size=idist.get_nproc_per_node()).activate()
    return RunDevice.of(settings.device).activate()


def run_device(settings: RunSettings) -> torch.device:
    """``settings.device`` resolved: :func:`run_placement`'s device."""
    return run_placement(settings).device


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
        raise ConfigError(f"the {name} set is empty: there is nothing to train or evaluate on")
    return x, y


def _check_not_empty(data: Any, name: str) -> None:
    """A map-style set with no sample: one line now, not an error deep inside the first epoch."""
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset) and hasattr(data, "__len__"):
        if len(data) == 0:
            raise ConfigError(f"the {name} set is empty: there is nothing to train or evaluate on")


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


def _nbytes(value: Any) -> int:
    t = torch.as_tensor(value)
    return t.nelement() * t.element_size()


def read_into_memory(data: Dataset, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every ``(input, target)`` sample of ``data`` stacked into two tensors, once; refused in one line
    (a :class:`ConfigError`) when they would not fit in the memory of ``device`` (and of the machine,
    where they are built): their size is estimated from the first sample first."""
    n = len(data)
    if n == 0:
        raise ConfigError(f"the {name} set is empty: there is nothing to train or evaluate on")
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
    batch, limit, seed = settings.batch_size // world, settings.limit_train_batches, settings.seed
    workers = settings.num_workers
    kw = dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    settings = _with_collate(settings, kw, collate_fn)
    route = data_route(train, settings.data_path)
    _check_not_empty(train, "training")
    if sample_weights is not None and route == "stream":
        raise ConfigError("sample_weights need a set with a length, one weight per sample; a stream "
                          "(IterableDataset) is read in its own order: weight or repeat its items in __iter__")
    if settings.epoch_length is not None and route != "stream":
        raise ConfigError(f"{param('epoch_length')} is for streams (an IterableDataset); to train on part of each "
                          f"epoch use {param('limit_train_batches')}")
    if route == "memory":
        x, y = _tensor_pair(train, "training") or read_into_memory(train, "training", device)
        train_loader: Any = InMemoryLoader(x, y, batch, shuffle=True, seed=seed, device=device, max_batches=limit,
                                           rank=rank, world_size=world, weights=sample_weights)
        train_loader.drop_last = drop_lone_last and _lone_last(train_loader.num_samples, batch, limit)
    elif route == "loader":
        pair = _tensor_pair(train, "training")
        train_set = TensorDataset(*pair) if pair is not None and not isinstance(train, Dataset) else train
        sampler = ResumableRandomSampler(len(train_set), seed=seed, max_samples=limit * batch if limit else None,
                                         rank=rank, world_size=world, keyed=True, weights=sample_weights)
        train_loader = DataLoader(SeededDataset(train_set, seed), batch_size=batch, sampler=sampler,
                                  generator=torch.Generator().manual_seed(seed),
                                  drop_last=drop_lone_last and _lone_last(len(sampler), batch, None), **kw)
    else:
        lengths = [n for n in (settings.epoch_length, limit) if n]
        loader = make_stream_loader(train, batch, generator=torch.Generator().manual_seed(seed), **kw)
        train_loader = StreamLoader(loader, epoch_length=min(lengths, default=None),
                                    on_resume=None if is_stateful_stream(train) else _say_read_again,
                                    on_lone_batch=_say_lone_once(batch) if drop_lone_last else None)
        if settings.save_every_iters and not is_stateful_stream(train):
            write_line("The training stream has no state_dict: a resume mid-epoch reads again the batches that epoch "
                       "had consumed (exact when the stream yields the same items again)")
    return train_loader, _val_loader(val, settings, device, rank, world, kw)


def _labels_of(loader: Any) -> Any:
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


def build_run(
    model: nn.Module,
    train: Data,
    val: Data,
    settings: RunSettings | None = None,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    classification: bool = True,
    metrics: Mapping[str, Metric] | None = None,
    handlers: Sequence[Any] = (),
    to_save: Mapping[str, Any] | None = None,
    denormalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    name: str = "run",
    extra_config: Mapping[str, Any] | None = None,
    train_transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    pair_transform: Callable[[Any, Any], tuple[Any, Any]] | None = None,
    prepare_batch: Callable[[Any, torch.device, bool], tuple[Any, Any]] | None = None,
    model_transform: Callable[[Any], torch.Tensor] | None = None,
    output_transform: Callable[[Any, Any, torch.Tensor], tuple[torch.Tensor, Any]] | None = None,
    collate_fn: Callable[[list], Any] | None = None,
    sample_weights: Any = None,
    model_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> Run:
    """Everything :func:`fit` does up to ``trainer.run``: the :class:`handlers.run.Run`, whose
    ``trainer``, ``evaluator`` and handlers you can still change before ``run.run()``.
    The arguments are :func:`fit`'s.
    """
    settings = (settings or RunSettings()).check()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    place = run_placement(settings)  # decided once: everything below asks it
    device = place.device
    train_loader, val_loader = make_loaders(train, val, settings, device, collate_fn,
                                            drop_lone_last=has_batch_norm(model), sample_weights=sample_weights)
    world = idist.get_world_size()
    send_home(model, optimizer, device)  # the model, and a given optimizer's state, on the run's device
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)  # before DDP, which fixes its buckets' strides
    optimizer = idist.auto_optim(optimizer or make_optimizer(settings, model))  # lr "find": set after the finder
    if loss_fn is None:
        loss_fn = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing) if classification else nn.MSELoss()
    amp = resolve_amp(settings.amp, device, log=write_line)
    checks = dict(prepare_batch=prepare_batch or default_prepare_batch, model_transform=model_transform,
                  loss_fn=loss_fn, classification=classification, device=device, amp=amp, model_fn=model_fn)
    for line in unregistered(model):
        write_line(line)
    classes = check_first_batches(model, {"training": train_loader, "validation": val_loader}, log=write_line,
                                  **checks)  # before any file
    train_prepare, val_prepare = _guarded_labels(place, model, classes, checks)
    precision_choice = None
    if settings.amp == "auto" and place.is_cuda and amp == "bf16":  # a GPU: the faster of the two, measured
        amp, precision_choice = _auto_precision(model, train_loader, settings, place, loss_fn, checks)
    labels = _labels_of(train_loader) if classification and sample_weights is None else None
    imbalanced = class_balance(labels) if labels is not None else None
    if imbalanced is not None:
        write_line(imbalanced)
    train_model = idist.auto_model(model) if world > 1 else model  # DDP: gradients averaged over ranks
    if settings.compile:
        write_line(f"torch.compile: its kernels are kept in {compile_cache()} for the next run of this model and "
                   f"shapes, which starts from them (delete the folder to clear it)")
    run_model = torch.compile(train_model) if settings.compile else train_model
    eval_model = run_model if world == 1 else model  # no collectives in evaluation: shards may differ in size
    finder = None
    if settings.find_lr or settings.lr == "find":
        finder = _run_lr_finder(run_model, optimizer, loss_fn, train_loader, settings, device, amp,
                                dict(prepare_batch=train_prepare, model_transform=model_transform, model_fn=model_fn,
                                     output_transform=output_transform, batch_transform=train_transform,
                                     pair_transform=pair_transform))
        if settings.find_lr:
            return _FinderOnly(finder, settings, name)
        if finder.suggestion is None:
            raise ConfigError(f"the LR finder found no learning rate to suggest (the loss did not fall and rise "
                              f"again over {len(finder.results['lr'])} batches): give {param('lr')} a value")
        for group in optimizer.param_groups:
            group["lr"] = finder.suggestion
        settings = dataclasses.replace(settings, lr=finder.suggestion)
    ema = _ema(model, settings.ema) if settings.ema else None
    trainer = create_trainer(run_model, optimizer, loss_fn, device=device, amp=amp,
                             accumulation_steps=settings.accumulation_steps, clip_grad_norm=settings.clip_grad_norm,
                             grad_norm_every=settings.log_every if settings.tensorboard else 0,
                             channels_last=settings.channels_last, prepare_batch=train_prepare,
                             model_fn=model_fn, model_transform=model_transform, output_transform=output_transform,
                             batch_transform=train_transform, pair_transform=pair_transform, seed=settings.seed)
    if ema is not None:  # before the checkpoints: a save at an iteration holds that iteration's average
        ema.attach(trainer, name="ema_momentum")

    plain_loss = _unsmoothed(loss_fn)  # what train_loss and val_loss report
    view = AccuracyView(loss_fn)  # labels, soft labels or per-label binary

    def evaluator_of(net: nn.Module, extra: Mapping[str, Metric]) -> Engine:
        val_metrics: dict[str, Metric] = {"loss": Loss(plain_loss)}
        if classification:
            val_metrics["accuracy"] = Accuracy(output_transform=view)
        val_metrics.update({**extra, "samples": SampleCount()})
        return create_evaluator(net, val_metrics, device=device, amp=amp, channels_last=settings.channels_last,
                                prepare_batch=val_prepare, model_fn=model_fn, model_transform=model_transform,
                                output_transform=output_transform)

    evaluator = evaluator_of(ema.ema_model if ema is not None else eval_model, metrics or {})
    saved = {"model": model}
    if ema is not None:  # the best file's model is the average; the momentum warm-up resumes where it was
        saved = {"model": ema.ema_model, "raw_model": model, "ema_momentum": _StepCount(ema.momentum_scheduler)}
    run = attach_run(trainer, evaluator, train_loader=train_loader, val_loader=val_loader, settings=settings,
                     to_save={**saved, "optimizer": optimizer, **(to_save or {})},
                     classification=classification, handlers=handlers, denormalize=denormalize, name=name,
                     device=place,
                     extra_config={"device": str(device), "precision": amp or "fp32",
                                   **({"precision_choice": precision_choice} if precision_choice else {}),
                                    **({"train_transform": repr(train_transform)} if train_transform else {}),
                                    **({"pair_transform": repr(pair_transform)} if pair_transform else {}),
                                    **({"lr_finder": {"suggestion": finder.suggestion, "range": list(finder.tried)}}
                                       if finder is not None else {}),
                                    **(extra_config or {})},
                     train_loss_fn=None if plain_loss is loss_fn else plain_loss, accuracy_view=view)

    def explain(batch: Any, name: str) -> str | None:  # a batch that failed: the data's fault?
        try:
            check_batch(model, batch, name, **checks)
        except ConfigError as exc:
            return str(exc)
        return None

    run.explain = explain
    if isinstance(train_loader, DataLoader) and train_loader.num_workers == 0 and idist.get_rank() == 0:
        DataWaitHint(train_loader.dataset, log=write_line).attach(trainer)
    if finder is not None and idist.get_rank() == 0:
        finder.write(run.output_dir, tensorboard=settings.tensorboard)
    if ema is not None:  # the raw weights' scores beside the average's: val_raw_loss, val_raw_accuracy
        raw = evaluator_of(eval_model, {})
        Validation(raw, val_loader, every=settings.val_every, prefix="val_raw_").attach(trainer)
    return run


def fit(model: nn.Module, train: Data, val: Data, settings: RunSettings | None = None, **options: Any) -> RunResult:
    """Train ``model`` on ``train``, validating on ``val``, with every default handler; run to the end.

    Args:
        model: any ``nn.Module``; moved to ``settings.device`` (DDP-wrapped in a distributed run).
        train, val: a pair of tensors ``(inputs, targets)`` (held on the device), a ``Dataset``
            (read batch by batch through a ``DataLoader``, its random transforms drawn afresh each
            epoch) or an ``IterableDataset`` (a stream); see :func:`make_loaders`.
        settings: :class:`engine.RunSettings` (default: all defaults).
        loss_fn: default cross-entropy (with ``settings.label_smoothing``) for classification, else MSE.
        optimizer: default from ``settings`` (:func:`make_optimizer`).
        classification: ``False`` for regression or anything else without class labels: no accuracy,
            confusion matrix or misclassified images, and ``monitor`` defaults to ``val_loss`` (``min``).
        metrics: more validation metrics (Ignite ``Metric`` s on ``(y_pred, y)``), as ``val_<name>``.
        handlers: your handlers, attached after ours (see :func:`handlers.run.attach_run`).
        to_save: more objects with ``state_dict`` to keep in every checkpoint.
        denormalize: maps normalised inputs back to [0, 1] for TensorBoard images.
        name: default folder name, ``runs/<name>-<timestamp>``.
        train_transform: a batch transform ``fn(x, generator) -> x`` applied to each training batch
            on the device (e.g. ``engine.transforms.Compose(RandomCrop(4), RandomHorizontalFlip())``),
            its draws seeded from ``(seed, epoch, iteration)``; the evaluator never sees it.
        pair_transform: ``fn(x, y) -> (x, y)`` on each training batch after ``train_transform``:
            torchvision's ``v2.MixUp(num_classes=C)`` or ``v2.CutMix(num_classes=C)`` (soft targets:
            the training accuracy counts their most likely class), its draws from the global
            generators seeded from ``(seed, epoch, iteration)`` and put back after: exact on resume.
        prepare_batch: ``fn(batch, device, non_blocking) -> (x, y)`` (default: a pair, or a dict
            with a ``label``/``labels``/``target``/``targets``/``y`` key).
        model_fn: ``fn(model, x) -> output`` (Ignite's name and signature; default ``model(x)``): how the
            model is called, e.g. ``lambda model, x: model(**x)`` for a forward of several inputs fed a dict
            batch (``{"input_ids", "attention_mask", "labels"}``), with no wrapper module.
        model_transform: ``fn(model_output) -> y_pred``, for a model returning a dict or a tuple.
        output_transform: ``fn(x, y, y_pred) -> (y_pred, y)``: what the metrics see.
        collate_fn: ``fn(samples) -> batch`` for both sets (e.g. padding samples of different lengths);
            the sets then go through a ``DataLoader`` (or a stream's), tensors too.
        sample_weights: one number per training sample: each epoch draws as many samples with
            replacement, in proportion (class imbalance: ``(1 / torch.bincount(y).double())[y]``
            draws every class equally often), the draws seeded and resumed exactly as the order is.

    Seed the global RNG (``seed_everything(settings.seed)``) before building the model for a run
    that repeats bit for bit; the command-line layer does it before calling your function.

    Returns:
        :class:`handlers.run.RunResult`: history, best row, best/last checkpoint paths, exit code.
    """
    with returned_home(model, options.get("optimizer")):  # the model goes back where it came from
        return build_run(model, train, val, settings, **options).run()


def _auto_precision(model: nn.Module, loader: Any, settings: RunSettings, place: RunDevice, loss_fn: Callable,
                    checks: Mapping[str, Any]) -> tuple[str | None, dict[str, Any] | None]:  # fmt: skip
    """``amp="auto"`` on a GPU: bf16 when a step of this model on one of its training batches runs at least
    5% faster in it than in fp32, else fp32 (:func:`engine.amp.measure_precisions`; every process decides
    alike; the margin keeps two runs of a model timed alike from choosing apart). A resumed run keeps
    the precision it started with (its ``config.json``); a deterministic run decides nothing by a clock:
    fp32 (``amp="bf16"`` asks for bf16); a stream, which cannot be read ahead, bf16."""
    if settings.deterministic:
        write_line(f"{param('amp', 'auto')} with {param('deterministic')}: fp32 (nothing of a deterministic run is "
                   f"decided by timing it; {param('amp', 'bf16')} asks for bf16)")
        return None, {"chose": "fp32", "why": "deterministic"}
    earlier = Path(settings.output_dir or "") / "config.json"
    if settings.resume is not None and settings.output_dir and earlier.is_file():
        kept = json.loads(earlier.read_text()).get("precision")
        if kept in ("bf16", "fp32"):
            return (None if kept == "fp32" else kept), None
    batch = peek_batch(loader, max(1, settings.batch_size // idist.get_world_size()))
    if batch is None:
        return "bf16", None
    x, y = checks["prepare_batch"](batch, place.device, False)
    if settings.channels_last and isinstance(x, torch.Tensor) and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    timings = measure_precisions(model, x, y, loss_fn, place.device, (None, "bf16"),
                                 lambda m, inputs: predict(m, inputs, checks["model_transform"], checks["model_fn"]))
    if idist.get_world_size() > 1:  # one decision for every process: the sums of their timings
        summed = idist.all_reduce(torch.tensor([timings["fp32"], timings["bf16"]], dtype=torch.float64))
        timings = {"fp32": float(summed[0]), "bf16": float(summed[1])}
    chosen = "bf16" if timings["bf16"] <= 0.95 * timings["fp32"] else None
    gpu = torch.cuda.get_device_name(place.device)
    write_line(f"{param('amp', 'auto')}: {chosen or 'fp32'} for this model on {gpu} (a step: {timings['fp32']:.2f} ms "
               f"in fp32, {timings['bf16']:.2f} ms in bf16; bf16 when 5% faster)")
    return chosen, {"fp32_ms": round(timings["fp32"], 3), "bf16_ms": round(timings["bf16"], 3),
                    "chose": chosen or "fp32"}


def compile_cache() -> Path:
    """Where ``torch.compile`` keeps what it compiled (Inductor's on-disk caches: graphs, kernels,
    autotuning), so that a second run of the same model and shapes reuses it: ``$TORCHINDUCTOR_CACHE_DIR``
    if you set it, else ``$XDG_CACHE_HOME/ignite-trainer/compile`` (``~/.cache/...``, not a temporary folder
    that a reboot empties), set for this process."""
    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if given and os.path.abspath(given) != inductor_default_cache():
        return Path(given)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = base / "ignite-trainer" / "compile"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder


def _guarded_labels(place: RunDevice, model: nn.Module, classes: int | None,
                    checks: Mapping[str, Any]) -> tuple[Callable | None, Callable | None]:  # fmt: skip
    """The trainer's and the evaluator's ``prepare_batch``: off the CPU, with class labels checked on the
    host before the copy (:class:`~engine.checks.LabelGuard`), so that a label out of range is one line
    there too, not a device-side assert; on the CPU, the given one (the loss's own error is explained)."""
    loss_fn, given = checks["loss_fn"], checks["prepare_batch"]
    if place.type == "cpu" or not checks["classification"] or not isinstance(loss_fn, (nn.CrossEntropyLoss,
                                                                                         nn.NLLLoss)):
        return (None, None) if given is default_prepare_batch else (given, given)

    def guard(name: str) -> LabelGuard:
        return LabelGuard(given, name, classes, loss_fn.ignore_index,
                          probe=lambda batch: check_batch(model, batch, name, **checks))

    return guard("training"), guard("validation")


def _ema(model: nn.Module, decay: float) -> EMAHandler:
    """Ignite's ``EMAHandler`` with a warm-up: its momentum falls linearly from 1 (the average is the
    weights) to ``1 - decay`` over ``1 / (1 - decay)`` steps, so that a short run's average is not
    dominated by the random initial weights (``0.999`` without it: ~10% on a one-epoch MNIST run)."""
    return EMAHandler(model, momentum=1.0 - decay, momentum_warmup=1.0, warmup_iters=max(2, round(1 / (1 - decay))))


class _StepCount:
    """The step count of a param scheduler, as plain data (its own state holds its lambda, which a
    ``weights_only`` load refuses)."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def state_dict(self) -> dict[str, int]:
        return {"event_index": int(self.scheduler.event_index)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.scheduler.event_index = int(state["event_index"])


def _run_lr_finder(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, loader: Any,
                   settings: RunSettings, device: torch.device, amp: str | None, step: dict[str, Any]) -> LRFinder:
    """The LR finder on a bare trainer of the same step, over the run's training loader, whose data
    order (and a stream's place) is put back afterwards; says what it found."""
    order = data_order(loader, None)
    saved = order.state_dict() if order is not None else None
    trainer = create_trainer(model, optimizer, loss_fn, device=device, amp=amp,
                             accumulation_steps=settings.accumulation_steps, clip_grad_norm=settings.clip_grad_norm,
                             channels_last=settings.channels_last, seed=settings.seed, **step)
    to_save = {"model": model, "optimizer": optimizer}
    if trainer.scaler is not None:
        to_save["scaler"] = trainer.scaler
    try:
        with deterministic_algorithms(settings.deterministic):
            finder = LRFinder(log=write_line, cuda_device=device if device.type == "cuda" else None).run(
                trainer, loader, to_save)
    finally:
        if order is not None:
            order.load_state_dict(saved)
    write_line(finder.line())
    return finder


class _FinderOnly:
    """What :func:`build_run` returns for ``settings.find_lr``: its ``run()`` writes the finder's
    results into the run folder and returns exit code 0, without training."""

    def __init__(self, finder: LRFinder, settings: RunSettings, name: str) -> None:
        self.finder, self.settings, self.name = finder, settings, name

    def run(self) -> RunResult:
        out = check_output_dir(self.settings.output_dir, self.settings.resume, self.name)
        if idist.get_rank() == 0:
            make_output_dir(out)
            self.finder.write(out, tensorboard=self.settings.tensorboard)
            then = f"train at it with {param('lr', 'find')} or " if self.finder.suggestion is not None else "then "
            write_line(f"LR finder results: {out / 'lr_finder.json'}, {out / 'lr_finder.png'}; {then}"
                       f"give {param('lr')} a value")
        return RunResult(0, out)


def _unsmoothed(loss_fn: Callable) -> Callable:
    """Validation (and ``train_loss``) report the plain cross-entropy, as the seed did, whatever the
    training smoothing."""
    if isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.label_smoothing:
        # the function, not a module: train_loss computes it every step, and a module call costs
        # ~50 us more there (just after the optimizer step, with cold caches)
        return functools.partial(F.cross_entropy, weight=loss_fn.weight, ignore_index=loss_fn.ignore_index)
    return loss_fn
