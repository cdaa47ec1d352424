"""Deterministic mode: the same inputs give the same bits on CUDA as they do on a CPU.

CUDA kernels are free to sum in any order (atomic adds in some backward passes, cuDNN algorithms
picked by timing), so two runs of the same step can differ in the last bits, and a run resumed
from a checkpoint drifts from the uninterrupted one. :func:`deterministic_algorithms` switches
PyTorch to its deterministic kernels for the length of a block and puts everything back after.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch
from torch.nn import functional as F

from engine.errors import ConfigError, param

__all__ = ["CUBLAS_WORKSPACE", "deterministic_algorithms", "nondeterministic_op", "prepare_environment"]

CUBLAS_WORKSPACE = ":4096:8"  # what cuBLAS needs to choose the same reduction every time (CUDA >= 10.2)


def prepare_environment(deterministic: bool) -> None:
    """Set ``CUBLAS_WORKSPACE_CONFIG`` (unless set already) for a deterministic run; to take effect
    it must be set before the process makes its first cuBLAS handle, so call it before CUDA starts
    (the command line does, before it launches any process; processes it starts inherit it)."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Within this block, with ``enabled``: ``torch.use_deterministic_algorithms(True)``, cuDNN
    deterministic with its benchmark off, cuBLAS's workspace fixed, and adaptive pooling that tiles
    its input evenly computed by the plain pooling it equals (see :func:`_even_pooling`: PyTorch
    has no deterministic backward for ``AdaptiveMaxPool2d``/``AdaptiveAvgPool2d`` on CUDA, and
    refuses them). Everything is as it was after."""
    if not enabled:
        yield
        return
    prepare_environment(True)
    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             cudnn.deterministic, cudnn.benchmark, F.adaptive_max_pool2d, F.adaptive_avg_pool2d)
    torch.use_deterministic_algorithms(True)
    cudnn.deterministic, cudnn.benchmark = True, False
    F.adaptive_max_pool2d = _even_pooling(saved[4], F.max_pool2d)
    F.adaptive_avg_pool2d = _even_pooling(saved[5], F.avg_pool2d)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.deterministic, cudnn.benchmark = saved[2], saved[3]
        F.adaptive_max_pool2d, F.adaptive_avg_pool2d = saved[4], saved[5]


def _even_pooling(adaptive: Callable, plain: Callable,
                  where: Callable[[torch.Tensor], bool] = lambda t: t.is_cuda) -> Callable:  # fmt: skip
    """``adaptive(input, output_size, ...)`` computed as ``plain(input, k, stride=k, ...)`` where that
    is the same pooling (each output cell pools a ``k``-sized window and the windows tile the input:
    every input size divisible by its output size; a global pool is one window) and the input needs
    a gradient on CUDA: there the plain pooling's backward gathers (deterministic) where the adaptive
    one adds atomically (PyTorch refuses it in deterministic mode). Elsewhere the adaptive one runs."""

    def pool(input: torch.Tensor, output_size, *args, **kwargs):
        if where(input) and input.requires_grad and torch.is_grad_enabled() and input.dim() in (3, 4):
            size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
            size = tuple(n if o is None else o for n, o in zip(input.shape[-2:], size))
            if all(o > 0 and n % o == 0 for n, o in zip(input.shape[-2:], size)):
                kernel = tuple(n // o for n, o in zip(input.shape[-2:], size))
                return plain(input, kernel, kernel, *args, **kwargs) if plain is F.avg_pool2d else \
                    plain(input, kernel, kernel, 0, 1, False, *args, **kwargs)
        return adaptive(input, output_size, *args, **kwargs)

    return pool


def nondeterministic_op(exc: BaseException) -> ConfigError | None:
    """The one line for an operation PyTorch has no deterministic kernel for (raised in deterministic
    mode), naming it and the way out; ``None`` for any other error."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or "does not have a deterministic implementation" not in text:
        return None
    op = text.split(" does not have", 1)[0].strip()
    return ConfigError(f"{op} has no deterministic implementation on this device, so {param('deterministic')} "
                       f"cannot make this model's run repeat bit for bit: run without it")
