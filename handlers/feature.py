"""An optional part of a run (the LR finder, the weight average, ...): one object that :func:`handlers.fit.build_run`
asks at each of its phases, so that a new feature enters ``build_run`` at one line (its entry in the list
of features) and lives whole in its own module."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from ignite.engine import Engine
from ignite.metrics import Metric
from torch import nn

from engine.batch import ModelCalls
from engine.checks import BatchCheck
from engine.device import RunDevice
from engine.settings import RunSettings

if TYPE_CHECKING:
    from handlers.run import Run, RunResult

__all__ = ["RunFeature", "RunParts", "RunResultMaker", "features_of"]


@dataclass
class RunParts:
    """What :func:`~handlers.fit.build_run` has made so far, phase by phase; what a feature may read or change.

    ``model`` is the user's module; ``run_model`` what the trainer calls (DDP-wrapped, compiled);
    ``eval_model`` what the evaluator calls; ``saved`` the model entries of every checkpoint;
    ``config`` more entries for ``config.json``.
    """

    model: nn.Module
    settings: RunSettings
    device: RunDevice
    calls: ModelCalls
    name: str
    classification: bool
    train_loader: Any = None
    val_loader: Any = None
    optimizer: torch.optim.Optimizer | None = None
    loss_fn: Callable | None = None
    amp: str | None = None
    check: BatchCheck | None = None  # how a batch is checked against the model (and a failing one explained)
    train_prepare: Callable | None = None  # the trainer's and the evaluator's prepare_batch (the label guards)
    val_prepare: Callable | None = None
    dense_classes: int | None = None  # the classes of a dense classifier ([N, C, H, W] outputs: segmentation)
    run_model: nn.Module | None = None
    eval_model: nn.Module | None = None
    trainer: Engine | None = None
    make_evaluator: Callable[[nn.Module, Mapping[str, Metric]], Engine] | None = None
    saved: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    engine_options: dict[str, Any] = field(default_factory=dict)  # the trainer's batch and pair transforms


class RunFeature:
    """The phases a feature may take part in; each default does nothing. Subclass it and add an instance
    to the features of :func:`~handlers.fit.build_run` (``None`` where the settings leave it off)."""

    def before_training(self, parts: RunParts) -> RunResultMaker | None:
        """After the model is placed and wrapped, before the trainer exists. Return an object whose
        ``run()`` ends the run without training (the LR finder alone) to stop building there."""
        return None

    def on_trainer(self, parts: RunParts) -> None:
        """The trainer exists (``parts.trainer``), its handlers not yet: attach what must run before them."""

    def evaluated(self, model: nn.Module) -> nn.Module:
        """The model the validation scores (and the best checkpoint keeps)."""
        return model

    def saved(self, saved: dict[str, Any]) -> dict[str, Any]:
        """The model entries of every checkpoint."""
        return saved

    def after_attach(self, run: Run, parts: RunParts) -> None:
        """Every default handler is attached and the run resumed; the last chance before ``run.run()``."""


class RunResultMaker:
    """What :meth:`RunFeature.before_training` may return instead of a :class:`~handlers.run.Run`."""

    def run(self) -> RunResult:
        raise NotImplementedError


def features_of(candidates: Iterable[RunFeature | None]) -> list[RunFeature]:
    """The features the settings switched on (the candidates that are not ``None``)."""
    return [feature for feature in candidates if feature is not None]
