"""``fit``: build the engines and the loaders for your model and data, attach every default handler,
resume if asked, run to the end. The one call for the common case (Keras' ``model.fit``, Lightning's
``Trainer.fit``), with the Ignite engines still there to inspect (``fit(..., handlers=[...])``).

Example:
    >>> settings = RunSettings(epochs=5, lr=1e-3, output_dir="runs/mine", resume="auto")
    >>> result = fit(MyNet(), (x_train, y_train), (x_val, y_val), settings)
    >>> result.best_path, result.exit_code
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import ignite.distributed as idist
import torch
from ignite.metrics import Accuracy, Loss, Metric
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from engine import (
    ConfigError,
    InMemoryLoader,
    ResumableRandomSampler,
    RunSettings,
    create_evaluator,
    create_trainer,
    param,
    resolve_device,
)
from engine.amp import resolve_amp
from handlers.console import write_line
from handlers.metrics import SampleCount
from handlers.run import Run, RunResult, attach_run

__all__ = ["build_run", "fit", "make_loaders", "make_optimizer", "run_device"]

Data = Dataset | tuple[torch.Tensor, torch.Tensor]


def make_optimizer(settings: RunSettings, model: nn.Module) -> torch.optim.Optimizer:
    """``settings.optimizer`` (adam, adamw, or sgd with Nesterov momentum 0.9) at ``settings.lr``."""
    name, lr, wd = settings.optimizer, settings.lr, settings.weight_decay
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)


def run_device(settings: RunSettings) -> torch.device:
    """``settings.device`` resolved; in a distributed run on CUDA, this process's own GPU."""
    device = resolve_device(settings.device)
    if device.type == "cuda" and idist.get_world_size() > 1:
        device = torch.device("cuda", idist.get_local_rank())
        torch.cuda.set_device(device)
    return device


def _as_tensors(data: Data, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(data, (tuple, list)):
        if len(data) != 2 or not all(isinstance(t, torch.Tensor) for t in data):
            raise ConfigError(f"the {name} data must be a Dataset or a pair of tensors (inputs, targets)")
        return data[0], data[1]
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        return data.tensors[0], data.tensors[1]
    if len(data) == 0:
        raise ConfigError(f"the {name} set is empty: there is nothing to train or evaluate on")
    samples = [data[i] for i in range(len(data))]  # once: every later epoch slices tensors
    return torch.stack([torch.as_tensor(x) for x, _ in samples]), torch.stack([torch.as_tensor(y) for _, y in samples])


def _as_dataset(data: Data, name: str) -> Dataset:
    if isinstance(data, Dataset):
        return data
    return TensorDataset(*_as_tensors(data, name))


def make_loaders(train: Data, val: Data, settings: RunSettings, device: torch.device) -> tuple[Any, Any]:
    """The training and validation loaders this process iterates.

    ``settings.data_path == "memory"``: ``InMemoryLoader`` s over tensors on ``device`` (a
    ``Dataset`` is read into tensors once); ``"torchvision"``: ``DataLoader`` s with a
    ``ResumableRandomSampler``. Either way the order is seeded by ``settings.seed``, resumes
    exactly, and in a distributed run each process gets its shard (``batch_size`` is global).
    """
    rank, world = idist.get_rank(), idist.get_world_size()
    if settings.batch_size % world:
        raise ConfigError(f"{param('batch_size')} {settings.batch_size} is global: it must divide among "
                          f"{world} processes")
    batch, limit, seed = settings.batch_size // world, settings.limit_train_batches, settings.seed
    if settings.data_path == "memory":
        (x, y), (vx, vy) = _as_tensors(train, "training"), _as_tensors(val, "validation")
        return (InMemoryLoader(x, y, batch, shuffle=True, seed=seed, device=device, max_batches=limit,
                               rank=rank, world_size=world),
                InMemoryLoader(vx, vy, settings.val_batch_size, shuffle=False, device=device, rank=rank,
                               world_size=world))  # fmt: skip
    train_set, val_set = _as_dataset(train, "training"), _as_dataset(val, "validation")
    workers = settings.num_workers
    kw = dict(num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    sampler = ResumableRandomSampler(len(train_set), seed=seed, max_samples=limit * batch if limit else None,
                                     rank=rank, world_size=world)
    train_loader = DataLoader(train_set, batch_size=batch, sampler=sampler,
                              generator=torch.Generator().manual_seed(seed), **kw)
    if world > 1:
        val_set = Subset(val_set, range(rank, len(val_set), world))
    return train_loader, DataLoader(val_set, batch_size=settings.val_batch_size, shuffle=False, **kw)


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
) -> Run:
    """Everything :func:`fit` does up to ``trainer.run``: the :class:`handlers.run.Run`, whose
    ``trainer``, ``evaluator`` and handlers you can still change before ``run.run()``.
    The arguments are :func:`fit`'s.
    """
    settings = (settings or RunSettings()).check()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = run_device(settings)
    train_loader, val_loader = make_loaders(train, val, settings, device)
    world = idist.get_world_size()
    model.to(device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)  # before DDP, which fixes its buckets' strides
    optimizer = idist.auto_optim(optimizer or make_optimizer(settings, model))
    if loss_fn is None:
        loss_fn = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing) if classification else nn.MSELoss()
    amp = resolve_amp(settings.amp, device, log=write_line)
    train_model = idist.auto_model(model) if world > 1 else model  # DDP: gradients averaged over ranks
    run_model = torch.compile(train_model) if settings.compile else train_model
    eval_model = run_model if world == 1 else model  # no collectives in evaluation: shards may differ in size
    trainer = create_trainer(run_model, optimizer, loss_fn, device=device, amp=amp,
                             accumulation_steps=settings.accumulation_steps, clip_grad_norm=settings.clip_grad_norm,
                             grad_norm_every=settings.log_every if settings.tensorboard else 0,
                             channels_last=settings.channels_last)
    val_metrics: dict[str, Metric] = {"loss": Loss(_unsmoothed(loss_fn))}
    if classification:
        val_metrics["accuracy"] = Accuracy()
    val_metrics.update({**(metrics or {}), "samples": SampleCount()})
    evaluator = create_evaluator(eval_model, val_metrics, device=device, amp=amp,
                                 channels_last=settings.channels_last)
    return attach_run(trainer, evaluator, train_loader=train_loader, val_loader=val_loader, settings=settings,
                      to_save={"model": model, "optimizer": optimizer, **(to_save or {})},
                      classification=classification, handlers=handlers, denormalize=denormalize, name=name,
                      extra_config={"device": str(device), "precision": amp or "fp32", **(extra_config or {})})


def fit(model: nn.Module, train: Data, val: Data, settings: RunSettings | None = None, **options: Any) -> RunResult:
    """Train ``model`` on ``train``, validating on ``val``, with every default handler; run to the end.

    Args:
        model: any ``nn.Module``; moved to ``settings.device`` (DDP-wrapped in a distributed run).
        train, val: a ``Dataset`` of ``(input, target)`` or a pair of tensors ``(inputs, targets)``.
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

    Seed the global RNG (``seed_everything(settings.seed)``) before building the model for a run
    that repeats bit for bit; the command-line layer does it before calling your function.

    Returns:
        :class:`handlers.run.RunResult`: history, best row, best/last checkpoint paths, exit code.
    """
    return build_run(model, train, val, settings, **options).run()


def _unsmoothed(loss_fn: Callable) -> Callable:
    """Validation reports the plain cross-entropy, as the seed did, whatever the training smoothing."""
    if isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.label_smoothing:
        return nn.CrossEntropyLoss(weight=loss_fn.weight, ignore_index=loss_fn.ignore_index)
    return loss_fn
