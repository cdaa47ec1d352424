"""Mixed-precision helpers shared by the trainer and the evaluator."""

from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from engine.errors import ConfigError

__all__ = ["AMP_DTYPES", "autocast_context", "make_grad_scaler"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _check_amp(amp: str | None) -> None:
    if amp is not None and amp not in AMP_DTYPES:
        raise ConfigError(f"unknown mixed-precision mode {amp!r}: use one of {sorted(AMP_DTYPES)} or none")


def autocast_context(device: torch.device, amp: str | None) -> ContextManager:
    """Return an autocast context for ``amp`` (``"bf16"``, ``"fp16"`` or ``None`` for full precision)."""
    _check_amp(amp)
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


def make_grad_scaler(device: torch.device, amp: str | None) -> torch.amp.GradScaler | None:
    """A ``GradScaler`` for fp16 (whose small range needs loss scaling); ``None`` for bf16 and fp32."""
    _check_amp(amp)
    if amp != "fp16":
        return None
    return torch.amp.GradScaler(device.type)
