"""A user's program with the ordinary mistakes (tests/test_mistakes.py runs it as a real subprocess,
and its mended rerun in-process through the same `cli.main`): `--case` picks one; `--case ok` is the
same program with the mistake mended."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from engine import RunSettings
from handlers import cli, fit

CASES = ("ok", "float-targets", "target-out-of-range", "late-target-out-of-range", "lengths", "forward-bug",
         "getitem-bug", "nan-inputs", "regression-shapes", "empty-validation", "float64-inputs", "uint8-inputs",
         "list-inputs", "list-targets", "ragged-samples", "a-dataloader", "no-validation")


class Net(nn.Module):
    def __init__(self, bug_after: int | None = None) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
        self.bug_after, self.calls = bug_after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.bug_after is not None and self.calls > self.bug_after:
            raise ValueError("my bug in forward")
        return self.net(x)


class Samples(Dataset):
    """(input, target) samples; ``form`` makes the usual wrong ones: Python lists for inputs or
    targets, inputs of different lengths."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, broken: int | None = None, form: str = "ok") -> None:
        self.x, self.y, self.broken, self.form = x, y, broken, form

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        if i == self.broken:
            raise KeyError(f"sample {i} is missing")
        if self.form == "list-inputs":
            return self.x[i].tolist(), self.y[i]
        if self.form == "list-targets":
            return self.x[i], [self.y[i]]
        if self.form == "ragged-samples":
            return self.x[i, : 2 + i % 3], self.y[i]
        return self.x[i], self.y[i]


@dataclass
class Settings(RunSettings):
    case: str = "ok"
    epochs: int = 2
    batch_size: int = 16
    log_every: int = 0
    progress: bool = False
    tensorboard: bool = False


def train(s: Settings):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 4, generator=g), torch.randint(0, 3, (96,), generator=g)
    val = (x[:32], y[:32])
    case = s.case
    if case == "float-targets":
        return fit(Net(), (x, y.float()), val, s)
    if case in ("target-out-of-range", "late-target-out-of-range"):
        bad = y.clone()
        bad[70] = 5
        return fit(Net(), (x, bad) if case == "target-out-of-range" else Samples(x, bad), val, s)
    if case == "lengths":
        return fit(Net(), (x, y[:90]), val, s)
    if case == "forward-bug":
        return fit(Net(bug_after=8), (x, y), val, s)
    if case == "getitem-bug":
        return fit(Net(), Samples(x, y, broken=50), val, s)
    if case == "nan-inputs":
        x = x.clone()
        x[[7, 60]] = float("nan")
        return fit(Net(), (x, y), val, s)
    if case == "regression-shapes":
        return fit(Net(), (x, torch.randn(96)), (x[:32], torch.randn(32)), s, classification=False)
    if case == "empty-validation":
        return fit(Net(), (x, y), Samples(x[:0], y[:0]), s)
    if case == "float64-inputs":  # NumPy's default dtype
        return fit(Net(), (x.double(), y), val, s)
    if case == "uint8-inputs":  # pixels as stored
        return fit(Net(), ((x.abs() * 60).to(torch.uint8), y), val, s)
    if case in ("list-inputs", "list-targets", "ragged-samples"):
        return fit(Net(), Samples(x, y, form=case), val, s)
    if case == "a-dataloader":
        return fit(Net(), DataLoader(Samples(x, y), batch_size=16, shuffle=True), val, s)
    if case == "no-validation":
        return fit(Net(), (x, y), None, s)
    return fit(Net(), (x, y), val, s)


def main(argv: list[str] | None = None) -> int:
    parser = cli.run_parser("A user's program with a mistake.", Settings())
    parser.add_argument("--case", choices=CASES, default="ok")
    return cli.main(train, parser, Settings, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
