"""engine.checks on its own: which failures of a model's forward are the inputs' type (one line of ours),
and which are the model's own error (left as they are)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine.checks import input_mismatch


class Tokens(nn.Module):  # integer inputs are right here: an embedding
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(10, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x).mean(1).view(3, -1))  # a bug of the model's: the batch is not 3


def failure(model: nn.Module, x) -> BaseException:
    with pytest.raises((RuntimeError, TypeError)) as caught:
        model(x)
    return caught.value


@pytest.mark.parametrize("model, x, start, end", [
    (nn.Linear(4, 2), torch.randn(5, 4, dtype=torch.float64), "the training set's inputs are float64, but the "
     "model's parameters are float32 (", "convert them with .float() (NumPy arrays are float64: "
     "torch.from_numpy(a).float())"),
    (nn.Conv2d(1, 2, 3), torch.randn(5, 1, 8, 8, dtype=torch.float64), "the training set's inputs are float64, but "
     "the model's parameters are float32 (", "convert them with .float() (NumPy arrays are float64: "
     "torch.from_numpy(a).float())"),
    (nn.Conv2d(1, 2, 3), torch.zeros(5, 1, 8, 8, dtype=torch.uint8), "the training set's inputs are uint8, but the "
     "model's parameters are float32 (", "convert them with .float() (pixels: x.float() / 255)"),
    (nn.Linear(4, 2).to(torch.bfloat16), torch.randn(5, 4), "the training set's inputs are float32, but the model's "
     "parameters are bfloat16 (", "convert them with .to(torch.bfloat16)"),
    (nn.Linear(4, 2), [torch.randn(5), torch.randn(5)], "the training set's inputs reach the model as a list of 2, "
     "which it cannot take (", "return a tensor from __getitem__ (torch.tensor(...), not a Python list), or pass "
     "prepare_batch=fn(batch, device, non_blocking) -> (x, y)"),
])  # fmt: skip
def test_inputs_of_the_wrong_type_are_named_with_the_fix(model, x, start, end):
    message = input_mismatch(model, x, failure(model, x), "training")
    assert message is not None and message.startswith(start) and message.endswith(end), message


@pytest.mark.parametrize("model, x", [
    (Tokens(), torch.randint(0, 10, (4, 6))),  # int64 token ids are right: the view is the model's bug
    (nn.Linear(4, 2), torch.randn(5, 3)),  # the right dtype, the wrong width: torch's own words say it
])  # fmt: skip
def test_the_models_own_errors_are_left_to_it(model, x):
    assert input_mismatch(model, x, failure(model, x), "training") is None
