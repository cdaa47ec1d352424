"""``torch.compile`` for the batch size a run trains (and validates) with; a batch of another size, such as
an epoch's short last batch, runs eagerly instead of costing a second, dynamic-shape graph; the first
evaluation runs eagerly too, so that a run of one epoch does not trace a graph for it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["CompiledModel", "leading_size"]


def leading_size(args: tuple, kwargs: dict[str, Any]) -> int | None:
    """The batch dimension of a call's first tensor (positional, then keyword, then one level into a dict,
    list or tuple); ``None`` when there is none."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.shape[0] if value.dim() else None
        inner = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
        for item in inner:
            if isinstance(item, torch.Tensor):
                return item.shape[0] if item.dim() else None
    return None


class CompiledModel(nn.Module):
    """``torch.compile(model)`` called with the batch size it first saw in each mode (training, evaluation);
    a call with another batch size goes to ``model`` itself, eagerly, and so do the calls of the first
    evaluation pass (from the first switch to eval mode to the next switch back to training).

    Each graph is traced by Dynamo in every process, even when its kernels come from the cache. An epoch's
    last batch is usually short (60,000 samples in batches of 128 end with 96): compiled, it is a second
    graph with a dynamic batch dimension (~0.6 s on a 2-core CPU); eagerly, one slower step. The evaluation
    graph (~0.4 s there) pays for itself over several passes, not over one: a one-epoch run validates
    eagerly, a longer one compiles it from the second pass. The same parameters are used either way; the
    compiled module is the only child (its ``_orig_mod`` is ``model``).
    """

    def __init__(self, model: nn.Module, **compile_options: Any) -> None:
        super().__init__()
        self.compiled = torch.compile(model, **compile_options)
        self._sizes: dict[bool, int | None] = {}  # the compiled batch size in training, in evaluation
        self.eval_passes = 0  # switches from training to evaluation so far

    def train(self, mode: bool = True) -> CompiledModel:
        if not mode and self.training:
            self.eval_passes += 1
        return super().train(mode)

    @property
    def eager(self) -> nn.Module:
        """The module the compiled one wraps."""
        return self.compiled._orig_mod

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.training and self.eval_passes < 2:
            return self.eager(*args, **kwargs)
        size = leading_size(args, kwargs)
        compiled = self._sizes.setdefault(self.training, size)
        if size == compiled:
            return self.compiled(*args, **kwargs)
        return self.eager(*args, **kwargs)
