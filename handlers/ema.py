"""``--ema``: validate and keep the moving average of the weights (Ignite's ``EMAHandler``), whole in one
feature of the run: the average is what the validation scores and the best checkpoint holds, the raw
weights are scored beside it (``val_raw_loss``, ``val_raw_accuracy``), and its warm-up resumes exactly."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ignite.handlers import EMAHandler
from torch import nn

from handlers.feature import RunFeature, RunParts
from handlers.run import Run
from handlers.validation import Validation

__all__ = ["WeightAverage", "ema_handler"]


def ema_handler(model: nn.Module, decay: float) -> EMAHandler:
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


class WeightAverage(RunFeature):
    """The run's weight average, with ``decay`` (``settings.ema``)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.model, self.decay = model, decay
        self.handler: EMAHandler | None = None

    @classmethod
    def of(cls, parts: RunParts) -> WeightAverage | None:
        """The feature when ``settings.ema`` asks for it, else ``None``."""
        return cls(parts.model, parts.settings.ema) if parts.settings.ema else None

    def on_trainer(self, parts: RunParts) -> None:
        # before the checkpoints: a save at an iteration holds that iteration's average
        self.handler = ema_handler(self.model, self.decay)
        self.handler.attach(parts.trainer, name="ema_momentum")

    def evaluated(self, model: nn.Module) -> nn.Module:
        return self.handler.ema_model

    def saved(self, saved: dict[str, Any]) -> dict[str, Any]:
        # the best file's model is the average; the momentum warm-up resumes where it was
        return {**saved, "model": self.handler.ema_model, "raw_model": self.model,
                "ema_momentum": _StepCount(self.handler.momentum_scheduler)}

    def after_attach(self, run: Run, parts: RunParts) -> None:
        raw = parts.make_evaluator(parts.eval_model, {})  # the raw weights' scores beside the average's
        Validation(raw, parts.val_loader, every=parts.settings.val_every, prefix="val_raw_").attach(parts.trainer)
