"""Train a small CNN on CIFAR-10 (3-channel 32x32 colour images) with the usual augmentation (random crop
with padding 4, horizontal flip) and the flags and guarantees of train_mnist.py, through the same calls.

    python examples/train_cifar10.py --data-dir ./data              # downloads CIFAR-10 when missing
    python examples/train_cifar10.py --synthetic 512 --epochs 1     # offline: random images of that shape
    python examples/train_cifar10.py --data-path loader --num-workers 2   # torchvision transforms per sample

Default: the images as tensors on the device, cropped and flipped per sample there, a batch at a time
(``engine.transforms``); ``--data-path loader``: a DataLoader with torchvision's transforms in workers.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

# ours before torch: they import torch and Ignite with the garbage collector paused (engine/imports.py)
import torch
from torch import nn

from engine import RunSettings, load_dataset
from engine.transforms import Compose, RandomCrop, RandomHorizontalFlip
from handlers import cli, fit

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                         nn.MaxPool2d(2))  # fmt: skip


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU-pool blocks (32 -> 16 -> 8 -> 4 pixels) and a linear head."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 4 * width),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10))  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class CifarSettings(RunSettings):
    synthetic: int | None = None  # train on this many random images (torchvision's FakeData), no download
    width: int = 32
    augment: bool = True  # random crop (padding 4) and horizontal flip of the training images
    epochs: int = 10
    batch_size: int = 128
    lr: float = 4e-3
    scheduler: str = "onecycle"


def load_cifar10(s: CifarSettings) -> list:
    """[train, test]: normalised tensors (the default), or data sets with torchvision's per-sample
    transforms (``--data-path loader``; the training set's crop and flip there)."""
    from torchvision import datasets, transforms

    tensors = s.data_path in ("auto", "memory")
    plain = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    augment = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if s.augment else []
    tfs = [None, None] if tensors else [transforms.Compose(augment + plain), transforms.Compose(plain)]
    if s.synthetic:
        sets = [datasets.FakeData(s.synthetic, (3, 32, 32), 10, tf, random_offset=k * s.synthetic)
                for k, tf in enumerate(tfs)]  # fmt: skip
    else:
        sets = [load_dataset(datasets.CIFAR10, s.data_dir, train=t, download=s.download, transform=tf)
                for t, tf in zip((True, False), tfs)]  # fmt: skip
    if not tensors:
        return sets
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    if s.synthetic:  # FakeData's PIL images, read once
        pairs = [[(transforms.functional.pil_to_tensor(img), label) for img, label in ds] for ds in sets]
        raw = [(torch.stack([p[0] for p in ps]), torch.tensor([p[1] for p in ps])) for ps in pairs]
    else:
        raw = [(torch.from_numpy(ds.data).permute(0, 3, 1, 2), torch.tensor(ds.targets)) for ds in sets]
    return [((x.float() / 255 - mean) / std, y) for x, y in raw]


def train(s: CifarSettings):
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    train_set, test_set = load_cifar10(s)
    on_device = isinstance(train_set, tuple) and s.augment
    return fit(SmallCNN(s.width), train_set, test_set, s, name="cifar10", denormalize=lambda x: x * std + mean,
               train_transform=Compose(RandomCrop(4), RandomHorizontalFlip()) if on_device else None)


if __name__ == "__main__":
    parser = cli.run_parser("Train a small CNN on CIFAR-10.", CifarSettings())
    parser.add_argument("--synthetic", type=cli.positive_int, help="random images of CIFAR's shape, no download")
    parser.add_argument("--width", type=cli.positive_int, default=32, help="channels of the first block")
    parser.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                        help="no random crop and flip")
    cli.exit_process(cli.main(train, parser, CifarSettings))  # sys.exit without the ~1 s teardown
