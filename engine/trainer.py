"""The training engine: the seed's step (zero_grad, forward, loss, backward, step) in an Ignite ``Engine``."""

from __future__ import annotations

from typing import Any, Callable

import torch
from ignite.engine import Engine
from torch import nn

from engine.amp import autocast_context, make_grad_scaler
from engine.device import move_batch, resolve_device
from engine.errors import ConfigError

__all__ = ["TrainStep", "create_trainer"]

_get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)


class TrainStep:
    """One optimisation step on one batch; the process function of the trainer ``Engine``.

    Its output is a dict that metric handlers read without a second forward pass:
    ``loss`` (0-d tensor, the batch mean), ``y_pred`` (detached logits), ``y`` and ``batch_size``;
    plus ``grad_norm`` on the steps where it was measured.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        device: torch.device,
        *,
        non_blocking: bool = False,
        amp: str | None = None,
        scaler: torch.amp.GradScaler | None = None,
        accumulation_steps: int = 1,
        clip_grad_norm: float | None = None,
        grad_norm_every: int = 0,
        channels_last: bool = False,
    ) -> None:
        if not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ConfigError(f"accumulation_steps must be an integer >= 1, got {accumulation_steps!r}")
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ConfigError(f"clip_grad_norm must be > 0 (or None to switch it off), got {clip_grad_norm!r}")
        if not isinstance(grad_norm_every, int) or grad_norm_every < 0:
            raise ConfigError(f"grad_norm_every must be an integer >= 0, got {grad_norm_every!r}")
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.device = device
        self.non_blocking = non_blocking
        self.amp = amp
        self.scaler = scaler
        self.accumulation_steps = accumulation_steps
        self.clip_grad_norm = clip_grad_norm
        self.grad_norm_every = grad_norm_every
        self.channels_last = channels_last
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._wrapped = _innermost(model)
        autocast_context(device, amp)  # validates ``amp`` now rather than at the first batch

    def __call__(self, engine: Engine, batch: Any) -> dict[str, Any]:
        model, optimizer, acc = self.model, self.optimizer, self.accumulation_steps
        if not self._wrapped.training:  # an evaluator switched the model (or the module inside DDP) to eval
            model.train()
        x, y = move_batch(batch, self.device, self.non_blocking)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        iteration = engine.state.iteration
        if acc == 1 or (iteration - 1) % acc == 0:
            optimizer.zero_grad(set_to_none=True)
        with autocast_context(self.device, self.amp):
            y_pred = model(x)
            loss = self.loss_fn(y_pred, y)
        scaled = loss / acc if acc > 1 else loss
        if self.scaler is not None:
            self.scaler.scale(scaled).backward()
        else:
            scaled.backward()
        output = {"loss": loss.detach(), "y_pred": y_pred.detach(), "y": y, "batch_size": y.shape[0]}
        if iteration % acc == 0:
            if self.scaler is not None:
                self.scaler.unscale_(optimizer)
            if self.clip_grad_norm is not None:
                output["grad_norm"] = nn.utils.clip_grad_norm_(self._params, self.clip_grad_norm)
            elif self.grad_norm_every and iteration % self.grad_norm_every == 0:
                output["grad_norm"] = _total_norm(self._params)
            if self.scaler is not None:
                self.scaler.step(optimizer)
                self.scaler.update()
            else:
                optimizer.step()
        return output


def _innermost(model: nn.Module) -> nn.Module:
    """The user's module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers: an
    evaluator given that module switches it to eval without touching the wrapper's flag."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _total_norm(params: list[torch.Tensor]) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if _get_total_norm is not None:
        return _get_total_norm(grads, 2.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def create_trainer(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    device: str | torch.device | None = None,
    non_blocking: bool | None = None,
    amp: str | None = None,
    scaler: torch.amp.GradScaler | None = None,
    accumulation_steps: int = 1,
    clip_grad_norm: float | None = None,
    grad_norm_every: int = 0,
    channels_last: bool = False,
) -> Engine:
    """Build the trainer: a plain Ignite ``Engine`` running :class:`TrainStep` on each batch.

    The model is moved to ``device`` (automatic: CUDA, then MPS, then CPU). ``amp`` is ``"bf16"``,
    ``"fp16"`` (with a ``GradScaler``, created when not given) or ``None``. Gradients are accumulated
    over ``accumulation_steps`` batches and, if ``clip_grad_norm`` is set, clipped to that L2 norm.
    The step object is ``engine.train_step``; the scaler, if any, ``engine.scaler`` (checkpoint it).

    Example:
        >>> trainer = create_trainer(model, torch.optim.Adam(model.parameters()), nn.CrossEntropyLoss())
        >>> @trainer.on(Events.EPOCH_COMPLETED)
        ... def report(engine): print(engine.state.epoch)
        >>> trainer.run(train_loader, max_epochs=5)
    """
    device = resolve_device(device)
    if non_blocking is None:
        non_blocking = device.type == "cuda"
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.to(device)
    if scaler is None:
        scaler = make_grad_scaler(device, amp)
    step = TrainStep(
        model,
        optimizer,
        loss_fn,
        device,
        non_blocking=non_blocking,
        amp=amp,
        scaler=scaler,
        accumulation_steps=accumulation_steps,
        clip_grad_norm=clip_grad_norm,
        grad_norm_every=grad_norm_every,
        channels_last=channels_last,
    )
    engine = Engine(step)
    engine.train_step = step
    engine.scaler = scaler
    return engine
