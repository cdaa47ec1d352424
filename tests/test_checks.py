"""engine.checks on its own: which failures of a model's forward are the inputs' type (one line of ours),
and which are the model's own error (left as they are)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from engine import ConfigError
from engine.batch import prepare_batch
from engine.checks import (
    check_first_batches,
    class_balance,
    diagnose,
    input_mismatch,
    pixel_scale,
    probability_outputs,
    unregistered,
)

CHECKS = dict(prepare_batch=prepare_batch, model_transform=None, loss_fn=nn.CrossEntropyLoss(), classification=True,
              device=torch.device("cpu"))


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
    (nn.Linear(4, 2), {"x": torch.randn(5, 4), "name": ["a"] * 5}, "the training set's batches are dicts, so the "
     "model gets their keys besides the target (x, name) as one dict, which it cannot take (", "keep one input key "
     "beside the target key, make forward take the dict, or pass prepare_batch=fn(batch, device, non_blocking) -> "
     "(x, y)"),
    (nn.Conv2d(3, 4, 3), torch.rand(5, 8, 8, 3), "the training set's inputs are [5, 8, 8, 3], channels last, but "
     "the model's first convolution takes 3 channels first (", "put them first in __getitem__ (x.permute(2, 0, 1) "
     "for an [H, W, C] image; torchvision's ToTensor() does it for PIL images)"),
    (nn.Conv2d(1, 4, 3), torch.rand(5, 8, 8), "the training set's inputs are [5, 8, 8], with no channel dimension, "
     "but the model's first convolution takes 1 channel(s) (", "add it in __getitem__ (x.unsqueeze(0) for an [H, W] "
     "image)"),
    (nn.Linear(64, 2), torch.rand(5, 8, 8), "the training set's inputs are [5, 8, 8], but the model's first Linear "
     "takes 64 features (mat1 and mat2 shapes cannot be multiplied (40x8 and 64x2)): ", "flatten them (nn.Flatten() "
     "as the model's first layer)"),
])  # fmt: skip
def test_inputs_of_the_wrong_type_are_named_with_the_fix(model, x, start, end):
    message = input_mismatch(model, x, failure(model, x), "training")
    assert message is not None and message.startswith(start) and message.endswith(end), message


@pytest.mark.parametrize("model, x", [
    (Tokens(), torch.randint(0, 10, (4, 6))),  # int64 token ids are right: the view is the model's bug
    (nn.Linear(4, 2), torch.randn(5, 3)),  # the right dtype, the wrong width: torch's own words say it
    (nn.Linear(30, 2), torch.randn(5, 8, 8)),  # flattened it would not fit either
    (nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3)), torch.rand(5, 3, 8, 8)),  # the model's second layer
])  # fmt: skip
def test_the_models_own_errors_are_left_to_it(model, x):
    assert input_mismatch(model, x, failure(model, x), "training") is None


def test_samples_a_batch_cannot_hold_and_class_names_for_targets_are_named_with_the_fix():
    from PIL import Image
    from torch.utils.data import DataLoader

    pil = [(Image.new("RGB", (8, 8)), 0)] * 4
    with pytest.raises(ConfigError, match=re.escape("the training set's samples hold PIL.Image.Image, which a batch "
                                                    "cannot hold: add transform=torchvision.transforms.ToTensor() to "
                                                    "the dataset")):
        check_first_batches(nn.Linear(4, 2), {"training": DataLoader(pil, batch_size=2)}, **CHECKS)
    message = diagnose(torch.randn(3, 2), ("cat", "dog", "cat"), classification=True, loss_fn=nn.CrossEntropyLoss(),
                       name="validation")
    assert message is not None and message.startswith("the validation set's targets are class names ('cat', ...), "
                                                      "which the loss cannot take (") and message.endswith(
        "return each as its class index, an integer (classes = sorted(set(names)); classes.index(name))"), message


SOFTMAX_CE = ("The model's outputs are probabilities (each sums to 1 over its 3 classes), but CrossEntropyLoss takes "
              "logits (it applies log-softmax itself): remove the model's final Softmax, or it learns slowly and its "
              "loss cannot fall near 0")


@pytest.mark.parametrize("last, loss_fn, line", [
    (nn.Softmax(1), nn.CrossEntropyLoss(), SOFTMAX_CE),
    (nn.Softmax(1), nn.NLLLoss(), "The model's outputs are probabilities (each sums to 1 over its 3 classes), but "
                                  "NLLLoss takes log-probabilities: end the model with LogSoftmax, not Softmax"),
    (nn.Identity(), nn.CrossEntropyLoss(), None),
    (nn.LogSoftmax(1), nn.NLLLoss(), None),
    (nn.Softmax(1), nn.MSELoss(), None),  # not a classifier's loss: not ours to say
    (nn.Sigmoid(), nn.CrossEntropyLoss(), None),  # in [0, 1] but no distribution
])  # fmt: skip
def test_outputs_that_are_already_probabilities_are_said(last, loss_fn, line):
    model = nn.Sequential(nn.Linear(4, 3), last)
    assert probability_outputs(model(torch.randn(16, 4)), loss_fn) == line


class Loose(nn.Module):
    """Layers where PyTorch does not see them (a list, a dict, a bare tensor), and a list that only
    refers to registered ones (nothing to say)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = [nn.Linear(4, 4), nn.Linear(4, 3)]
        self.heads = {"a": nn.Linear(3, 3)}
        self.scale = torch.ones(3, requires_grad=True)
        self.body = nn.Sequential(nn.Linear(4, 3), nn.Softmax(1))
        self.refs = [self.body[0]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


LOOSE = [
    "The model's 'layers' is a Python list of 2 modules that PyTorch does not see: their parameters are not trained, "
    "saved or moved to the device; make it nn.ModuleList, unless they are kept out on purpose",
    "The model's 'heads' is a Python dict of 1 module that PyTorch does not see: their parameters are not trained, "
    "saved or moved to the device; make it nn.ModuleDict, unless they are kept out on purpose",
    "The model's 'scale' is a tensor that requires grad but is not an nn.Parameter: the optimizer does not train it "
    "and checkpoints do not save it; make it nn.Parameter(...)",
]


@pytest.mark.parametrize("model, lines", [
    (Loose(), LOOSE),
    (nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), []),
    (nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=8,
                    batch_first=True), []),
])  # fmt: skip
def test_modules_and_tensors_pytorch_does_not_see_are_named(model, lines):
    assert unregistered(model) == lines


def test_fit_says_them_once_before_training_and_trains_on(tmp_path, capsys):
    from engine import RunSettings
    from handlers import fit

    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    result = fit(Loose(), (x, y), (x, y),
                 RunSettings(output_dir=str(tmp_path / "r"), epochs=1, progress=False, log_every=0, tensorboard=False))
    out = capsys.readouterr().out
    assert result.exit_code == 0 and [out.count(line) for line in [SOFTMAX_CE, *LOOSE]] == [1, 1, 1, 1]


PIXELS = torch.randint(0, 256, (4, 3, 8, 8), generator=torch.Generator().manual_seed(0)).float()


@pytest.mark.parametrize("x, line", [
    (PIXELS, "The training set's inputs look like raw pixels (whole numbers from 0 to 255): a network trains poorly "
             "on that range; scale them (x / 255, or torchvision's ToTensor()), and normalise"),
    (PIXELS[:, 0], "The training set's inputs look like raw pixels (whole numbers from 2 to 254): "),  # [N, H, W]
    (PIXELS / 255 / 255, "The training set's inputs range from 0 to 0.0039, pixels divided by 255 twice (ToTensor() "
                         "already scales to [0, 1]): divide once"),
    (PIXELS / 255, None),
    ((PIXELS / 255 - 0.5) / 0.25, None),
    (PIXELS % 3, None),  # a board game's planes: small whole numbers
    (PIXELS[:, 0, 0], None),  # not image-shaped: features, whatever their scale
    (torch.rand(4, 1, 8, 8) * 0.003, None),  # small, but not multiples of 1/255**2
])  # fmt: skip
def test_raw_or_twice_scaled_pixels_are_said(x, line):
    said = pixel_scale(x, "training")
    assert said is None if line is None else said is not None and said.startswith(line), said


@pytest.mark.parametrize("labels, line", [
    (torch.cat([torch.zeros(900), torch.ones(100)]).long(),
     "The training set's classes are imbalanced: class 0 has 900 samples (90.0%), class 1 100 (a model always "
     "answering 0 is 90.0% right): fit(..., sample_weights=(1 / torch.bincount(y).double())[y]) draws every class "
     "equally often"),
    ([2] * 50 + [0] * 4 + [1] * 9, "The training set's classes are imbalanced: class 2 has 50 samples (79.4%), class 0 "
                                   "4 (a model always answering 2 is 79.4% right): "),
    (torch.arange(100) % 10, None),  # balanced
    (torch.cat([torch.zeros(70), torch.ones(30)]).long(), None),  # 70/30: less than 5 to 1
    (torch.rand(100), None),  # not labels
])  # fmt: skip
def test_imbalanced_classes_are_said_with_the_weights_that_even_them(labels, line):
    said = class_balance(labels)
    assert said is None if line is None else said is not None and said.startswith(line), said
