"""``fit``: build the engines and the loaders for your model and data, attach every default handler,
resume if asked, run to the end. The one call for the common case (Keras' ``model.fit``, Lightning's
``Trainer.fit``), with the Ignite engines still there to inspect (``fit(..., handlers=[...])``).

Example:
    >>> settings = RunSettings(epochs=5, lr=1e-3, output_dir="runs/mine", resume="auto")
    >>> result = fit(MyNet(), (x_train, y_train), (x_val, y_val), settings)
    >>> result.best_path, result.exit_code

``build_run`` is a list of named phases over one :class:`~handlers.feature.RunParts`; the data route is
:mod:`handlers.loaders`, the precision :mod:`handlers.precision`, the handlers :mod:`handlers.attach`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine
from ignite.metrics import ConfusionMatrix, Metric, mIoU
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from engine import RunSettings, create_evaluator, create_trainer
from engine.batch import ModelCalls
from engine.batch import prepare_batch as default_prepare_batch
from engine.checks import BatchCheck, LabelGuard, class_balance, has_batch_norm, unregistered
from engine.compiled import CompiledModel
from engine.device import RunDevice, process_device, returned_home, send_home
from engine.errors import ConfigError
from handlers.attach import attach_run
from handlers.compiler import CompiledArtifacts, compile_cache, warm_compiler
from handlers.console import write_line
from handlers.data_wait import DataWaitHint
from handlers.ema import WeightAverage
from handlers.feature import RunFeature, RunParts, features_of
from handlers.loaders import Data, labels_of, make_loaders
from handlers.lr_finder import FindingLR, LRFinderRun
from handlers.metrics import AccuracyView, validation_metrics
from handlers.ordering import run_period
from handlers.precision import choose_precision, resolve_precision
from handlers.run import Run, RunResult
from handlers.user_scheduler import UserScheduler

__all__ = ["build_run", "compile_cache", "fit", "make_loaders", "make_optimizer"]


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
    lr_scheduler: Any = None,
    lr_scheduler_interval: str = "step",
) -> Run | LRFinderRun:
    """Everything :func:`fit` does up to ``trainer.run``: the :class:`handlers.run.Run`, whose
    ``trainer``, ``evaluator`` and handlers you can still change before ``run.run()``.
    The arguments are :func:`fit`'s. With ``settings.find_lr`` it is an
    :class:`~handlers.lr_finder.LRFinderRun`, whose ``run()`` writes the finder's results and trains nothing.

    Each phase below is one call; an optional feature (:class:`~handlers.feature.RunFeature`) enters at
    one line, the list of features, and takes part in the phases it needs.
    """
    settings = (settings or RunSettings()).check()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.compile:
        warm_compiler()  # while the data goes to the device and the first batches are checked (the CLI: earlier)
    parts = RunParts(model, settings, process_device(settings.device),  # decided once: everything below asks it
                     ModelCalls.of(prepare_batch, model_fn, model_transform, output_transform), name, classification,
                     engine_options={"batch_transform": train_transform, "pair_transform": pair_transform})
    parts.train_loader, parts.val_loader = make_loaders(train, val, settings, parts.device.device, collate_fn,
                                                        drop_lone_last=has_batch_norm(model),
                                                        sample_weights=sample_weights)
    _place_model(parts, optimizer, loss_fn)  # the model, its optimizer's state and the loss, on the device
    _check_data(parts, check_balance=classification and sample_weights is None)  # before any file is made
    _wrap_model(parts)  # DDP in a distributed run, torch.compile
    features = features_of([FindingLR.of(parts), UserScheduler.of(lr_scheduler, lr_scheduler_interval, parts),
                            WeightAverage.of(parts), CompiledArtifacts.of(parts)])  # the optional features
    for feature in features:
        instead = feature.before_training(parts)
        if instead is not None:
            return instead
    _make_trainer(parts, features)
    evaluator = _make_evaluator(parts, features, metrics)
    parts.config.update({"train_transform": repr(train_transform)} if train_transform else {})
    parts.config.update({"pair_transform": repr(pair_transform)} if pair_transform else {})
    run = attach_run(parts.trainer, evaluator, train_loader=parts.train_loader, val_loader=parts.val_loader,
                     settings=parts.settings, to_save=_saved(parts, features, to_save),
                     classification=classification, handlers=handlers, denormalize=denormalize, name=name,
                     device=parts.device, extra_config={**parts.config, **(extra_config or {})},
                     train_loss_fn=_unsmoothed_or_none(parts.loss_fn), accuracy_view=AccuracyView(parts.loss_fn))
    _finish_run(run, parts, features)
    return run


def _place_model(parts: RunParts, optimizer: torch.optim.Optimizer | None, loss_fn: Callable | None) -> None:
    """The model (and a given optimizer's state) on the run's device, channels-last if asked (before DDP,
    which fixes its buckets' strides); the optimizer (``settings``'s by default); the loss (cross-entropy
    with the settings' label smoothing for a classifier, else MSE)."""
    s, model = parts.settings, parts.model
    send_home(model, optimizer, parts.device.device)
    if s.channels_last:
        model.to(memory_format=torch.channels_last)
    parts.optimizer = idist.auto_optim(optimizer or make_optimizer(s, model))  # lr "find": set after the finder
    if loss_fn is None:
        loss_fn = nn.CrossEntropyLoss(label_smoothing=s.label_smoothing) if parts.classification else nn.MSELoss()
    parts.loss_fn = loss_fn


def _check_data(parts: RunParts, check_balance: bool) -> None:
    """The precision resolved; the model's registration and the first batches of both sets checked against
    it (one line for the first mismatch); the label guards; on a GPU with ``--amp auto`` the precision
    measured; the class balance said."""
    model, device = parts.model, parts.device
    parts.amp = resolve_precision(parts.settings, device)
    parts.check = BatchCheck(parts.calls, parts.loss_fn, parts.classification, device.device, parts.amp)
    for line in unregistered(model):
        write_line(line)
    seen: dict[str, Any] = {}
    classes = parts.check.first_batches(model, {"training": parts.train_loader, "validation": parts.val_loader},
                                        log=write_line, seen=seen)
    parts.dense_classes = classes if classes and seen.get("output_dims", 2) > 2 else None
    parts.train_prepare, parts.val_prepare = _guarded_labels(device, model, classes, parts.check)
    parts.amp, choice = choose_precision(parts.amp, model, parts.train_loader, parts.settings, device, parts.loss_fn,
                                         parts.calls)
    parts.config.update({"device": str(device.device), "precision": parts.amp or "fp32"})
    if choice:
        parts.config["precision_choice"] = choice
    labels = labels_of(parts.train_loader) if check_balance else None
    imbalanced = class_balance(labels) if labels is not None else None
    if imbalanced is not None:
        write_line(imbalanced)


def _wrap_model(parts: RunParts) -> None:
    """What the trainer calls (DDP in a distributed run: gradients averaged over ranks; compiled with
    ``--compile``) and what the evaluator calls (no collectives in evaluation: shards may differ in size)."""
    world, model = idist.get_world_size(), parts.model
    train_model = idist.auto_model(model) if world > 1 else model
    if parts.settings.compile:
        write_line(f"torch.compile: its kernels are kept in {compile_cache()} for the next run of this model and "
                   f"shapes, which starts from them (delete the folder to clear it)")
    parts.run_model = CompiledModel(train_model) if parts.settings.compile else train_model
    parts.eval_model = parts.run_model if world == 1 else model


def _make_trainer(parts: RunParts, features: Sequence[RunFeature]) -> None:
    """The trainer of the run's step; then each feature's part on it (before any handler of ours)."""
    s = parts.settings
    parts.trainer = create_trainer(
        parts.run_model, parts.optimizer, parts.loss_fn, device=parts.device.device, amp=parts.amp,
        accumulation_steps=s.accumulation_steps, clip_grad_norm=s.clip_grad_norm,
        grad_norm_every=s.log_every if s.tensorboard else 0, channels_last=s.channels_last, seed=s.seed,
        **parts.calls.engine_kwargs(parts.train_prepare), **parts.engine_options)
    run_period(parts.trainer, s.val_every_iters)  # before any handler attaches to it
    for feature in features:
        feature.on_trainer(parts)


def _make_evaluator(parts: RunParts, features: Sequence[RunFeature], metrics: Mapping[str, Metric] | None) -> Engine:
    """The evaluator of the model the features say is scored, with the validation's metrics (the plain
    loss, accuracy, the user's, samples); ``parts.make_evaluator`` makes more of them (the EMA's raw scores)."""
    plain_loss, view = _unsmoothed(parts.loss_fn), AccuracyView(parts.loss_fn)

    def make_evaluator(net: nn.Module, extra: Mapping[str, Metric]) -> Engine:
        return create_evaluator(net, validation_metrics(plain_loss, parts.classification, view, extra),
                                device=parts.device.device, amp=parts.amp, channels_last=parts.settings.channels_last,
                                **parts.calls.engine_kwargs(parts.val_prepare))

    parts.make_evaluator = make_evaluator
    scored = parts.eval_model
    for feature in features:
        scored = feature.evaluated(scored)
    extra = dict(metrics or {})
    if parts.dense_classes:  # segmentation: the mean IoU over classes, as Ignite's mIoU computes it
        extra.setdefault("miou", mIoU(ConfusionMatrix(parts.dense_classes, device=parts.device.device)))
    return make_evaluator(scored, extra)


def _saved(parts: RunParts, features: Sequence[RunFeature], to_save: Mapping[str, Any] | None) -> dict[str, Any]:
    """What every checkpoint holds besides our handlers' states: the model (as the features say), the
    optimizer, the caller's objects."""
    saved: dict[str, Any] = {"model": parts.model}
    for feature in features:
        saved = feature.saved(saved)
    return {**saved, "optimizer": parts.optimizer, **(to_save or {})}


def _finish_run(run: Run, parts: RunParts, features: Sequence[RunFeature]) -> None:
    """What the run needs from the build: how to explain a failing batch (the data's fault?), the hint for
    a slow loader in the main process, each feature's last part."""
    check, model = parts.check, parts.model

    def explain(batch: Any, name: str) -> str | None:
        try:
            check.batch(model, batch, name)
        except ConfigError as exc:
            return str(exc)
        return None

    run.explain = explain
    loader = parts.train_loader
    if isinstance(loader, DataLoader) and loader.num_workers == 0 and idist.get_rank() == 0:
        DataWaitHint(loader.dataset, log=write_line).attach(parts.trainer)
    for feature in features:
        feature.after_attach(run, parts)


def fit(model: nn.Module, train: Data, val: Data, settings: RunSettings | None = None, **options: Any) -> RunResult:
    """Train ``model`` on ``train``, validating on ``val``, with every default handler; run to the end.

    Args:
        model: any ``nn.Module``; moved to ``settings.device`` (DDP-wrapped in a distributed run).
        train: a pair of tensors ``(inputs, targets)`` (held on the device), a ``Dataset``
            (read batch by batch through a ``DataLoader``, its random transforms drawn afresh each
            epoch) or an ``IterableDataset`` (a stream); see :func:`make_loaders`.
        val: the validation set, any of the same kinds.
        settings: :class:`engine.RunSettings` (default: all defaults).
        **options: the keyword arguments of :func:`build_run`, below.

    Keyword Args:
        loss_fn: default cross-entropy (with ``settings.label_smoothing``) for classification, else MSE.
        optimizer: default from ``settings`` (:func:`make_optimizer`).
        classification: ``False`` for regression or anything else without class labels: no accuracy,
            confusion matrix or misclassified images, and ``monitor`` defaults to ``val_loss`` (``min``).
        metrics: more validation metrics (Ignite ``Metric`` s on ``(y_pred, y)``), as ``val_<name>``.
        handlers: your handlers, attached after ours (see :func:`handlers.attach.attach_run`).
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
        lr_scheduler: your own LR scheduler (instead of ``settings.scheduler``): a torch ``LRScheduler``
            built on the ``optimizer`` you pass, ``fn(optimizer) -> scheduler`` (for the optimizer ``fit``
            makes), a ``ReduceLROnPlateau`` (stepped on ``settings.monitor`` after each validation) or an
            Ignite ``ParamScheduler``; saved in every checkpoint, resumed exactly
            (:mod:`handlers.user_scheduler`).
        lr_scheduler_interval: ``"step"`` (after each optimizer step) or ``"epoch"`` (after each epoch).
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


def _guarded_labels(device: RunDevice, model: nn.Module, classes: int | None,
                    check: BatchCheck) -> tuple[Callable | None, Callable | None]:  # fmt: skip
    """The trainer's and the evaluator's ``prepare_batch``: off the CPU, with class labels checked on the
    host before the copy (:class:`~engine.checks.LabelGuard`), so that a label out of range is one line
    there too, not a device-side assert; on the CPU, the given one (the loss's own error is explained)."""
    loss_fn, given = check.loss_fn, check.calls.prepare_batch
    if device.type == "cpu" or not check.classification or not isinstance(loss_fn, (nn.CrossEntropyLoss,
                                                                                      nn.NLLLoss)):
        return (None, None) if given is default_prepare_batch else (given, given)

    def guard(name: str) -> LabelGuard:
        return LabelGuard(given, name, classes, loss_fn.ignore_index,
                          probe=lambda batch: check.batch(model, batch, name))

    return guard("training"), guard("validation")


def _unsmoothed(loss_fn: Callable) -> Callable:
    """Validation (and ``train_loss``) report the plain cross-entropy, as the seed did, whatever the
    training smoothing."""
    if isinstance(loss_fn, nn.CrossEntropyLoss) and loss_fn.label_smoothing:
        # the function, not a module: train_loss computes it every step, and a module call costs
        # ~50 us more there (just after the optimizer step, with cold caches)
        return functools.partial(F.cross_entropy, weight=loss_fn.weight, ignore_index=loss_fn.ignore_index)
    return loss_fn


def _unsmoothed_or_none(loss_fn: Callable) -> Callable | None:
    """``train_loss``'s function when it is not the training loss itself (a smoothed cross-entropy)."""
    plain = _unsmoothed(loss_fn)
    return None if plain is loss_fn else plain
