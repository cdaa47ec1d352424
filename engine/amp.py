"""Mixed precision: autocast and ``GradScaler`` for the trainer and the evaluator, which reduced precision
the hardware computes natively (``amp="auto"`` considers bf16 only there), and, on a GPU, which of the
candidates runs the model faster (``amp="auto"`` there times them: bf16 is not always the faster one)."""

from __future__ import annotations

import contextlib
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from engine.errors import ConfigError, param

__all__ = ["AMP_DTYPES", "autocast_context", "make_grad_scaler", "measure_precisions", "native_precisions",
           "resolve_amp"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_CPU_NATIVE = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}


def _check_amp(amp: str | None) -> None:
    if amp is not None and amp not in AMP_DTYPES:
        raise ConfigError(f"unknown mixed-precision mode {amp!r}: use one of {sorted(AMP_DTYPES)} or none")


def autocast_context(device: torch.device, amp: str | None) -> AbstractContextManager:
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


def cpu_flags() -> tuple[str, set[str]]:
    """(CPU model name, feature flags): the features from PyTorch's own probe (``torch.cpu.get_capabilities``,
    which knows x86, ARM and macOS alike: ``avx512_bf16``, ``amx_bf16``, ...), the name from ``/proc/cpuinfo``
    where there is one; on a torch without the probe, both from ``/proc/cpuinfo`` (empty where there is none)."""
    model, flags = _proc_cpuinfo()
    get = getattr(torch.cpu, "get_capabilities", None)
    try:
        capabilities = get() if get is not None else None
    except Exception:  # the probe failed on this CPU: /proc/cpuinfo's flags stand
        capabilities = None
    if capabilities:
        flags = {name for name, value in capabilities.items() if value is True}
        if model in ("", platform.machine()) and capabilities.get("cpu_name"):
            model = str(capabilities["cpu_name"])
    return model, flags


def _proc_cpuinfo() -> tuple[str, set[str]]:
    """(CPU model name, feature flags) from /proc/cpuinfo; the machine's name and no flag where there is none."""
    info = Path("/proc/cpuinfo")
    text = info.read_text(errors="replace") if info.is_file() else ""
    model, flags = platform.processor() or platform.machine(), set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    return model, flags


def native_precisions(device: torch.device) -> dict[str, str]:
    """Reduced precisions ``device`` computes natively, each with the feature that says so:
    CUDA (fp16; bf16 where ``torch.cuda.is_bf16_supported`` without emulation), CPUs with
    AVX512-BF16 / AMX-BF16 (bf16) or AVX512-FP16 / AMX-FP16 (fp16). Anything else emulates them."""
    if device.type == "cuda":
        found = {"fp16": torch.cuda.get_device_name(device)}
        try:
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # an older torch without the argument
            bf16 = torch.cuda.is_bf16_supported()
        if bf16:
            found["bf16"] = found["fp16"]
        return found
    if device.type == "cpu":
        _, flags = cpu_flags()
        return {amp: feature for amp, features in _CPU_NATIVE.items() for feature in features if feature in flags}
    return {}


def resolve_amp(amp: str | None, device: torch.device, log: Callable[[str], None] = print) -> str | None:
    """The precision to run: ``"auto"`` is bf16 where the hardware computes it natively, else full
    precision (``None``); an explicit ``"bf16"``/``"fp16"`` it would emulate runs, after one warning line."""
    if amp is None or amp == "fp32":
        return None
    if amp == "auto":
        return "bf16" if "bf16" in native_precisions(device) else None
    _check_amp(amp)
    if amp not in native_precisions(device):
        where = cpu_flags()[0] if device.type == "cpu" else device.type
        features = " or ".join(f.upper().replace("_", "-") for f in _CPU_NATIVE[amp]) if device.type == "cpu" else ""
        why = f"it has no {features}" if features else f"{device.type} has no native {amp} path here"
        log(f"warning: {param('amp', amp)} will likely be slower than full precision on {where}: {why}, "
            f"so {amp} is emulated ({param('amp', 'auto')} picks what is native)")
    return amp


def measure_precisions(model: torch.nn.Module, x: Any, y: Any, loss_fn: Callable, device: torch.device,
                       candidates: tuple[str | None, ...], call: Callable[[torch.nn.Module, Any], Any],
                       rounds: int = 6, warmup: int = 2) -> dict[str, float]:  # fmt: skip
    """Milliseconds (median) of one forward and backward of ``(x, y)`` in each of ``candidates`` (``None``:
    fp32), as cuDNN's benchmark times its algorithms: alternating, after ``warmup`` rounds, the device
    synchronised around each. ``call(model, x)`` gives the predictions. The model is left as it was:
    its parameters untouched, its buffers (BatchNorm's statistics) put back, no gradient kept, the random
    generators (dropout's) as before."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    was_training = model.training
    model.train()
    times: dict[str | None, list[float]] = {c: [] for c in candidates}
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        for r in range(warmup + rounds):
            for amp in candidates if r % 2 == 0 else tuple(reversed(candidates)):
                _sync(device)
                start = time.perf_counter()
                with autocast_context(device, amp):
                    loss = loss_fn(call(model, x), y)
                loss.backward()
                _sync(device)
                if r >= warmup:
                    times[amp].append((time.perf_counter() - start) * 1e3)
    for weight in model.parameters():
        weight.grad = None
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(buffers[name])
    model.train(was_training)
    return {amp or "fp32": statistics.median(ms) for amp, ms in times.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
