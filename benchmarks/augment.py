"""Augmented CIFAR-shaped training throughput, side by side in one process, rounds alternating:

- fast path: tensors on the device, ``RandomCrop(4)`` + ``RandomHorizontalFlip()`` batch transforms;
- loader path: ``fit`` on a ``Dataset`` whose ``__getitem__`` applies torchvision's RandomCrop(32, padding=4),
  RandomHorizontalFlip, ToTensor, Normalize to uint8 images (as torchvision's CIFAR10 does), 0 and 2 workers;
- a plain PyTorch loop over a DataLoader of the same data set and transforms, 0 and 2 workers.

Each trains one epoch of the same small CNN and validates once; the figure is the median of the rounds.
It also times what the per-batch seeding of the loader path costs per sample.

    python benchmarks/augment.py [--rounds 3] [--samples 4096]

Last line: loader_vs_plain_w0=<ratio> loader_vs_plain_w2=<ratio> (time of fit / time of the plain loop)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
from common import machine, quiet
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from engine import RunSettings
from engine.seeding import SeededDataset
from engine.transforms import Compose, RandomCrop, RandomHorizontalFlip
from handlers import fit, seed_everything

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class CifarLike(Dataset):
    """uint8 HWC images in memory, PIL + torchvision transforms per sample: torchvision's CIFAR10."""

    def __init__(self, n: int, seed: int, train: bool) -> None:
        g = np.random.default_rng(seed)
        self.data = g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        self.targets = g.integers(0, 10, n).tolist()
        aug = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if train else []
        self.tf = transforms.Compose([*aug, transforms.ToTensor(), transforms.Normalize(MEAN, STD)])

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.tf(Image.fromarray(self.data[i])), self.targets[i]


def as_tensors(ds: CifarLike) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float().div(255)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1), torch.tensor(ds.targets)


def cnn(width: int = 16) -> nn.Module:
    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(*block(3, width), *block(width, 2 * width), *block(2 * width, 4 * width),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10))  # fmt: skip


def plain_loop(train: Dataset, val: Dataset, batch: int, workers: int) -> None:
    """What a user writes without us: Adam, cross-entropy, one epoch, one validation."""
    model = cnn()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for x, y in DataLoader(train, batch_size=batch, shuffle=True, num_workers=workers):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(val, batch_size=1000, num_workers=workers):
            correct += int((model(x).argmax(1) == y).sum())


def ours(train, val, batch: int, workers: int, **options) -> None:
    with tempfile.TemporaryDirectory() as out, quiet():
        settings = RunSettings(output_dir=out, epochs=1, batch_size=batch, num_workers=workers, progress=False,
                               log_every=0, tensorboard=False, patience=0)
        fit(cnn(), train, val, settings, **options)


def seeding_cost(ds: CifarLike, batch: int, rounds: int = 20) -> float:
    """Microseconds per sample that SeededDataset adds to fetching a batch (main process)."""
    seeded, keys = SeededDataset(ds, 0), [(1, i) for i in range(batch)]
    plain, wrapped = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        [ds[i] for i in range(batch)]
        plain.append(time.perf_counter() - start)
        start = time.perf_counter()
        seeded.__getitems__(keys)
        wrapped.append(time.perf_counter() - start)
    return (statistics.median(wrapped) - statistics.median(plain)) / batch * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args()
    print(f"machine: {machine()}")
    train, val = CifarLike(args.samples, 1, True), CifarLike(1000, 2, False)
    tensors, val_tensors = as_tensors(train), as_tensors(val)
    b = args.batch_size
    runs = {
        "fast path, batch transforms": lambda: ours(tensors, val_tensors, b, 0,
                                                    train_transform=Compose(RandomCrop(4), RandomHorizontalFlip())),
        "loader path, 0 workers": lambda: ours(train, val, b, 0),
        "plain loop, 0 workers": lambda: plain_loop(train, val, b, 0),
        "loader path, 2 workers": lambda: ours(train, val, b, 2),
        "plain loop, 2 workers": lambda: plain_loop(train, val, b, 2),
    }  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(args.rounds):
        for name, run in runs.items():
            seed_everything(r)
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
            print(f"round {r + 1}: {name}: {times[name][-1]:.2f} s", flush=True)
    med = {name: statistics.median(v) for name, v in times.items()}
    for name, value in med.items():
        print(f"{name:>28}: {value:6.2f} s  {args.samples / value:8,.0f} samples/s (median of {args.rounds})")
    print(f"seeding cost: {seeding_cost(train, b):.2f} us per sample (batch {b}, main process)")
    w0 = med["loader path, 0 workers"] / med["plain loop, 0 workers"]
    w2 = med["loader path, 2 workers"] / med["plain loop, 2 workers"]
    print(f"loader_vs_plain_w0={w0:.3f} loader_vs_plain_w2={w2:.3f}")


if __name__ == "__main__":
    main()
