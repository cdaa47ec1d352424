"""The training engine: the seed's step (zero_grad, forward, loss, backward, step) in an Ignite ``Engine``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events
from torch import nn

from engine.amp import autocast_context, make_grad_scaler
from engine.batch import prepare_batch as default_prepare_batch
from engine.compiled import CompiledModel
from engine.device import resolve_device
from engine.errors import ConfigError
from engine.seeding import batch_generator, mix_seed, seeded_globals

__all__ = ["TrainStep", "check_prediction", "create_trainer", "predict"]

_get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)


class TrainStep:
    """One optimisation step on one batch; the process function of the trainer ``Engine``.

    Its output is a dict that metric handlers read without a second forward pass:
    ``loss`` (0-d tensor, the batch mean), ``y_pred`` (detached logits), ``y`` and ``batch_size``;
    plus ``grad_norm`` on the steps where it was measured.

    Batches and outputs of any shape, with Ignite's names (``create_supervised_trainer``):
    ``prepare_batch(batch, device, non_blocking) -> (x, y)`` (default: a pair, or a dict with a
    target key), ``model_fn(model, x) -> output`` (default ``model(x)``; a model of several inputs:
    ``lambda model, x: model(**x)``), ``model_transform(output) -> y_pred`` (e.g. ``lambda out: out["logits"]``),
    ``output_transform(x, y, y_pred) -> (y_pred, y)``: what the training metrics see.
    ``batch_transform(x, generator) -> x`` augments the batch on the device, drawing from a
    generator seeded from ``(seed, epoch, iteration)`` (:mod:`engine.transforms`).
    ``pair_transform(x, y) -> (x, y)`` then transforms inputs and targets together (torchvision's
    ``v2.MixUp`` / ``v2.CutMix``: soft targets), the global generators it draws from seeded from
    ``(seed, epoch, iteration)`` for the call and put back after (:func:`engine.seeding.seeded_globals`).
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
        prepare_batch: Callable[[Any, torch.device, bool], tuple[Any, Any]] | None = None,
        model_transform: Callable[[Any], torch.Tensor] | None = None,
        output_transform: Callable[[Any, Any, torch.Tensor], tuple[torch.Tensor, Any]] | None = None,
        batch_transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        pair_transform: Callable[[Any, Any], tuple[Any, Any]] | None = None,
        seed: int = 0,
        model_fn: Callable[[nn.Module, Any], Any] | None = None,
    ) -> None:
        for name, fn in (("prepare_batch", prepare_batch), ("model_fn", model_fn), ("model_transform", model_transform),
                         ("output_transform", output_transform), ("batch_transform", batch_transform),
                         ("pair_transform", pair_transform)):
            if fn is not None and not callable(fn):
                raise ConfigError(f"{name} must be callable, got {type(fn).__name__}")
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
        self.prepare_batch = prepare_batch or default_prepare_batch
        self.model_fn = model_fn
        self.model_transform = model_transform
        self.output_transform = output_transform
        self.batch_transform = batch_transform
        self.pair_transform = pair_transform
        self.seed = seed
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.lr: Any = optimizer.param_groups[0]["lr"]  # the learning rate of the latest step
        self._window = accumulation_steps  # the size of the accumulation window under way
        self._pending = 0  # batches accumulated since the last optimizer step
        self._wrapped = _innermost(model)
        autocast_context(device, amp)  # validates ``amp`` now rather than at the first batch

    def __call__(self, engine: Engine, batch: Any) -> dict[str, Any]:
        model, optimizer, acc = self.model, self.optimizer, self.accumulation_steps
        if not self._wrapped.training:  # an evaluator switched the model (or the module inside DDP) to eval
            model.train()
        self.lr = optimizer.param_groups[0]["lr"]  # what this iteration's step uses (schedules set it before)
        x, y = self.prepare_batch(batch, self.device, self.non_blocking)
        iteration = engine.state.iteration
        if self.batch_transform is not None:
            x = self.batch_transform(x, batch_generator(self.seed, engine.state.epoch, iteration, x.device))
        if self.pair_transform is not None:
            with seeded_globals(mix_seed(self.seed, engine.state.epoch, iteration, 1), self.device):
                x, y = self.pair_transform(x, y)
        if self.channels_last and isinstance(x, torch.Tensor) and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        start, last = True, True
        if acc > 1:  # windows of acc batches within an epoch; one cut short by the epoch's end counts its own size
            length = engine.state.epoch_length
            position = (iteration % length or length) if length else iteration  # 1-based, in the epoch
            start, last = (position - 1) % acc == 0, position % acc == 0 or position == length
            if start:
                self._window = min(acc, length - position + 1) if length else acc
        if start:
            optimizer.zero_grad(set_to_none=True)
        with autocast_context(self.device, self.amp):
            y_pred = predict(model, x, self.model_transform, self.model_fn)
            loss = self.loss_fn(y_pred, y)
        scaled = loss / self._window if acc > 1 else loss
        if self.scaler is not None:
            self.scaler.scale(scaled).backward()
        else:
            scaled.backward()
        seen, target = y_pred.detach(), y
        if self.output_transform is not None:
            seen, target = self.output_transform(x, y, seen)
        output = {"loss": loss.detach(), "y_pred": seen, "y": target, "batch_size": len(target)}
        if last:
            self._pending = 0
            self._optimizer_step(output, iteration)
        else:
            self._pending += 1
        return output

    def _optimizer_step(self, output: dict[str, Any], iteration: int) -> None:
        """Unscale (fp16), clip or measure the gradients' norm, step the optimizer."""
        optimizer = self.optimizer
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

    @property
    def stepped(self) -> bool:
        """Whether the latest batch ended an accumulation window (the optimizer stepped)."""
        return self._pending == 0

    def finish_window(self, engine: Engine) -> None:
        """At an epoch's end whose length was not known in advance (a stream's first pass): the window the
        pass cut short is stepped, its gradients scaled from ``1 / accumulation_steps`` to ``1 / its size``."""
        if not self._pending:
            return
        factor = self.accumulation_steps / self._pending
        for param in self._params:
            if param.grad is not None:
                param.grad.mul_(factor)
        self._pending = 0
        self._optimizer_step({}, engine.state.iteration)


def predict(model: nn.Module, x: Any, model_transform: Callable[[Any], torch.Tensor] | None = None,
            model_fn: Callable[[nn.Module, Any], Any] | None = None) -> torch.Tensor:
    """The model's predictions for ``x``: its output (``model_fn(model, x)``, default ``model(x)``),
    through ``model_transform`` when given; anything but a tensor ends in one line (:func:`check_prediction`)."""
    out = model(x) if model_fn is None else model_fn(model, x)
    y_pred = model_transform(out) if model_transform is not None else out
    if type(y_pred) is not torch.Tensor:
        check_prediction(y_pred, model_transform is not None)
    return y_pred


def check_prediction(y_pred: Any, transformed: bool = False) -> None:
    """Raise :class:`ConfigError` in one line unless ``y_pred`` is a tensor (what a loss can take),
    naming what the model returned and the ``model_transform`` that would pick the tensor out."""
    if isinstance(y_pred, torch.Tensor):
        return
    if isinstance(y_pred, Mapping):
        first = next(iter(y_pred), "logits")
        what, fix = f"a dict with keys {', '.join(map(str, y_pred))}", f'lambda out: out["{first}"]'
    elif isinstance(y_pred, (tuple, list)):
        what, fix = f"a {type(y_pred).__name__} of {len(y_pred)}", "lambda out: out[0]"
    else:
        what, fix = f"a {type(y_pred).__name__}", "a function returning the tensor of predictions"
    if transformed:
        raise ConfigError(f"model_transform returned {what}, not a tensor of predictions")
    raise ConfigError(f"the model returned {what}, not a tensor: pass model_transform={fix} (the tensor the loss "
                      f"and metrics take)")


def _innermost(model: nn.Module) -> nn.Module:
    """The user's module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers: an
    evaluator given that module switches it to eval without touching the wrapper's flag."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(model, CompiledModel):
            model = model.eager
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
    prepare_batch: Callable[[Any, torch.device, bool], tuple[Any, Any]] | None = None,
    model_transform: Callable[[Any], torch.Tensor] | None = None,
    output_transform: Callable[[Any, Any, torch.Tensor], tuple[torch.Tensor, Any]] | None = None,
    batch_transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    pair_transform: Callable[[Any, Any], tuple[Any, Any]] | None = None,
    seed: int = 0,
    model_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> Engine:
    """Build the trainer: a plain Ignite ``Engine`` running :class:`TrainStep` on each batch.

    The model is moved to ``device`` (automatic: CUDA, then MPS, then CPU). ``amp`` is ``"bf16"``,
    ``"fp16"`` (with a ``GradScaler``, created when not given) or ``None``. Gradients are accumulated
    over ``accumulation_steps`` batches and, if ``clip_grad_norm`` is set, clipped to that L2 norm.
    ``prepare_batch``, ``model_fn``, ``model_transform``, ``output_transform``, ``batch_transform``,
    ``pair_transform`` and ``seed``: see :class:`TrainStep`.
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
        prepare_batch=prepare_batch,
        model_transform=model_transform,
        output_transform=output_transform,
        batch_transform=batch_transform,
        pair_transform=pair_transform,
        seed=seed,
        model_fn=model_fn,
    )
    engine = Engine(step)
    if accumulation_steps > 1:  # a stream's first pass, of unknown length, may end inside a window
        engine.add_event_handler(Events.EPOCH_COMPLETED, step.finish_window)
    engine.train_step = step
    engine.scaler = scaler
    return engine
