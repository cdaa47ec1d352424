"""evaluate() and predict() after fit: the best checkpoint's scores on a test set equal the run's own
validation of it, for tensors, a Dataset and a stream; predictions agree; mistakes are one line."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset, TensorDataset

from engine import ConfigError, RunSettings
from handlers import evaluate, fit, predict, seed_everything


class Inputs(Dataset):
    """Inputs only, as new data to predict comes."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


class Pairs(IterableDataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        yield from zip(self.x, self.y)


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    seed_everything(0)
    result = fit(net(), (x[:200], y[:200]), (x[200:], y[200:]),
                 RunSettings(output_dir=str(tmp_path_factory.mktemp("run")), epochs=4, lr=1e-2, batch_size=32,
                             val_batch_size=30, progress=False, log_every=0, tensorboard=False))  # fmt: skip
    return result, x[200:], y[200:]


@pytest.mark.parametrize("form", ["tensors", "dataset", "stream"])
def test_the_best_checkpoint_scores_on_a_test_set_as_the_run_validated_it(trained, form):
    result, x, y = trained
    data = {"tensors": (x, y), "dataset": TensorDataset(x, y), "stream": Pairs(x, y)}[form]
    scores = evaluate(net(), data, RunSettings(val_batch_size=30), checkpoint=result.best_path)
    assert scores["samples"] == 100 and scores["accuracy"] == result.best["val_accuracy"]
    assert scores["loss"] == pytest.approx(result.best["val_loss"], rel=1e-6)


def test_predictions_in_order_agree_with_the_scores_and_need_no_targets(trained):
    result, x, y = trained
    logits = predict(net(), x, checkpoint=result.best_path)
    assert logits.shape == (100, 3) and logits.dtype == torch.float32
    assert (logits.argmax(1) == y).float().mean().item() == pytest.approx(result.best["val_accuracy"])
    assert torch.equal(predict(net(), Inputs(x), checkpoint=result.best_path), logits)
    assert torch.equal(predict(net(), (x, y), checkpoint=result.best_path), logits)


def test_mistakes_after_training_are_one_line(trained):
    result, x, y = trained
    with pytest.raises(ConfigError, match=r"checkpoint .* holds another model's weights \(Error\(s\) in loading "
                                          r"state_dict.*\): build the model as the run that saved it did"):
        evaluate(nn.Linear(4, 3), (x, y), checkpoint=result.best_path)
    with pytest.raises(ConfigError, match=r"the prediction set's inputs are float64, but the model's parameters are "
                                          r"float32 .*convert them with .float\(\)"):
        predict(net(), x.double(), checkpoint=result.best_path)
    with pytest.raises(ConfigError, match=r"the test set holds class 7, but the model has 3 outputs"):
        evaluate(net(), (x, torch.full_like(y, 7)), checkpoint=result.best_path)
