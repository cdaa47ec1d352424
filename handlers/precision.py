"""The run's one choice of precision: ``--amp`` resolved for the device (:func:`engine.amp.resolve_amp`),
and with ``--amp auto`` on a GPU the faster of bf16 and fp32 for this model, measured, or the precision a
resumed run started with."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ignite.distributed as idist
import torch
from torch import nn

from engine.amp import measure_precisions, resolve_amp
from engine.batch import ModelCalls
from engine.checks import peek_batch
from engine.device import RunDevice
from engine.errors import param
from engine.settings import RunSettings
from engine.trainer import predict
from handlers.console import write_line
from handlers.run_folder import saved_config

__all__ = ["choose_precision", "resolve_precision"]


def resolve_precision(settings: RunSettings, device: RunDevice) -> str | None:
    """``settings.amp`` for ``device`` (``None``: fp32), said in a line where ``auto`` chose (before the
    data checks, which run in it)."""
    return resolve_amp(settings.amp, device.device, log=write_line)


def choose_precision(amp: str | None, model: nn.Module, loader: Any, settings: RunSettings, device: RunDevice,
                     loss_fn: Callable, calls: ModelCalls) -> tuple[str | None, dict[str, Any] | None]:  # fmt: skip
    """The run's precision and, where it was measured, the record of that choice (for ``config.json``):
    ``amp`` as resolved, except ``auto`` on a GPU, where bf16 wins only by measure (:func:`_measured`)."""
    if settings.amp == "auto" and device.is_cuda and amp == "bf16":
        return _measured(model, loader, settings, device, loss_fn, calls)
    return amp, None


def _measured(model: nn.Module, loader: Any, settings: RunSettings, device: RunDevice, loss_fn: Callable,
              calls: ModelCalls) -> tuple[str | None, dict[str, Any] | None]:  # fmt: skip
    """``amp="auto"`` on a GPU: bf16 when a step of this model on one of its training batches runs at least
    5% faster in it than in fp32, else fp32 (:func:`engine.amp.measure_precisions`; every process decides
    alike; the margin keeps two runs of a model timed alike from choosing apart). A resumed run keeps
    the precision it started with (its ``config.json``); a deterministic run decides nothing by a clock:
    fp32 (``amp="bf16"`` asks for bf16); a stream, which cannot be read ahead, bf16."""
    if settings.deterministic:
        write_line(f"{param('amp', 'auto')} with {param('deterministic')}: fp32 (nothing of a deterministic run is "
                   f"decided by timing it; {param('amp', 'bf16')} asks for bf16)")
        return None, {"chose": "fp32", "why": "deterministic"}
    earlier = saved_config(settings.output_dir) if settings.resume is not None else None
    if earlier is not None and earlier.get("precision") in ("bf16", "fp32"):
        kept = earlier["precision"]
        return (None if kept == "fp32" else kept), None
    batch = peek_batch(loader, max(1, settings.batch_size // idist.get_world_size()))
    if batch is None:
        return "bf16", None
    x, y = calls.prepare_batch(batch, device.device, False)
    if settings.channels_last and isinstance(x, torch.Tensor) and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    timings = measure_precisions(model, x, y, loss_fn, device.device, (None, "bf16"),
                                 lambda m, inputs: predict(m, inputs, calls.model_transform, calls.model_fn))
    if idist.get_world_size() > 1:  # one decision for every process: the sums of their timings
        summed = idist.all_reduce(torch.tensor([timings["fp32"], timings["bf16"]], dtype=torch.float64))
        timings = {"fp32": float(summed[0]), "bf16": float(summed[1])}
    chosen = "bf16" if timings["bf16"] <= 0.95 * timings["fp32"] else None
    gpu = torch.cuda.get_device_name(device.device)
    write_line(f"{param('amp', 'auto')}: {chosen or 'fp32'} for this model on {gpu} (a step: {timings['fp32']:.2f} ms "
               f"in fp32, {timings['bf16']:.2f} ms in bf16; bf16 when 5% faster)")
    return chosen, {"fp32_ms": round(timings["fp32"], 3), "bf16_ms": round(timings["bf16"], 3),
                    "chose": chosen or "fp32"}
