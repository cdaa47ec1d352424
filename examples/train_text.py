"""A model of several inputs: token sequences of different lengths, padded per batch into a dict, read by a
``forward(input_ids, attention_mask)`` that ``model_fn`` calls with the dict's keys.

    python examples/train_text.py --output-dir runs/text
"""

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch
from torch import nn
from torch.utils.data import Dataset

from engine import RunSettings
from handlers import cli, fit


class Reviews(Dataset):
    """``n`` sequences of 4 to 19 token ids (a vocabulary of 100; 0 is padding), labelled 1 when most ids
    are below 50: a text set as a tokenizer leaves it, one tensor of its own length per sample."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(4, 20, (n,), generator=g).tolist()
        self.ids = [torch.randint(1, 100, (k,), generator=g) for k in lengths]
        self.labels = [int((ids < 50).float().mean() > 0.5) for ids in self.ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.ids[i], self.labels[i]


def pad(samples: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    """One batch: the ids padded with 0 to the longest, the mask of real tokens, the labels."""
    ids = nn.utils.rnn.pad_sequence([ids for ids, _ in samples], batch_first=True)
    return {"input_ids": ids, "attention_mask": ids != 0, "labels": torch.tensor([label for _, label in samples])}


class TextClassifier(nn.Module):
    """Embeddings averaged over the real tokens, then a linear layer: two inputs, as a transformer takes them."""

    def __init__(self, vocab: int = 100, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.head = nn.Linear(dim, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).float()
        return self.head((self.embed(input_ids) * mask).sum(1) / mask.sum(1))


@dataclass
class TextSettings(RunSettings):
    epochs: int = 5
    lr: float = 1e-2


def train(s: TextSettings):
    # the batch is {"input_ids", "attention_mask", "labels"}: "labels" is the target, the rest the inputs (a dict),
    # which model_fn hands to forward as keyword arguments
    return fit(TextClassifier(), Reviews(2048, 0), Reviews(512, 1), s, collate_fn=pad,
               model_fn=lambda model, x: model(**x))


if __name__ == "__main__":
    parser = cli.run_parser("Classify token sequences of different lengths.", TextSettings())
    cli.exit_process(cli.main(train, parser, TextSettings))
