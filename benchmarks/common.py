"""Helpers shared by the benchmarks: where MNIST is, the data as tensors, the model measured, quiet runs.

The benchmarks measure the library (``engine``, ``handlers``); where they need the example's whole
recipe they run ``examples/train_mnist.py`` as a process, as a user would.
"""

from __future__ import annotations

import contextlib
import io
import os
import platform
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine import load_dataset  # noqa: E402

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def mnist_root() -> str:
    """$MNIST_ROOT, else ../shared/data beside the checkout, else ./data."""
    for candidate in (os.environ.get("MNIST_ROOT"), ROOT.parent / "shared" / "data", ROOT / "data"):
        if candidate and (Path(candidate) / "MNIST" / "raw").is_dir():
            return str(candidate)
    sys.exit("MNIST not found: set MNIST_ROOT to a folder holding MNIST/raw")


def mnist_tensors(root: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(train images, labels), (test images, labels)], normalised once, as the in-memory path holds them."""
    import torchvision

    sets = [load_dataset(torchvision.datasets.MNIST, root, train=t, download=False) for t in (True, False)]
    return [(ds.data.float().div_(255).sub_(MNIST_MEAN).div_(MNIST_STD).unsqueeze_(1), ds.targets) for ds in sets]


def mnist_datasets(root: str) -> list:
    """[train, test] torchvision data sets with the seed's per-sample ToTensor + Normalize (the DataLoader path)."""
    import torchvision
    from torchvision import transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))])
    return [load_dataset(torchvision.datasets.MNIST, root, train=t, download=False, transform=tf)
            for t in (True, False)]


def seed_cnn() -> nn.Module:
    """The seed's CNN (``SeedNet`` of examples/train_mnist.py): conv32, conv64, max-pool, dropout, fc128, fc10."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25),
        nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10),
    )  # fmt: skip


def mnist_cnn(width: int = 16) -> nn.Module:
    """The default preset's network (``FastNet`` of examples/train_mnist.py), as the model under test."""
    w, w2 = width, width * 3 // 2
    return nn.Sequential(
        nn.Conv2d(1, w, 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
        nn.Conv2d(w, w2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w2), nn.ReLU(inplace=True),
        nn.Conv2d(w2, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
        nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(inplace=True),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4 * w, 10),
    )  # fmt: skip


@contextlib.contextmanager
def quiet():
    """Swallow stdout (the runs' console lines) while timing."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def machine() -> str:
    """The CPU model, cores, the reduced precisions it computes natively, torch and its threads."""
    from engine.amp import cpu_flags, native_precisions

    model, _ = cpu_flags()
    native = ", ".join(f"{k} ({v})" for k, v in native_precisions(torch.device("cpu")).items()) or "none"
    return (f"{model or platform.machine()}, {os.cpu_count()} CPUs, native reduced precision: {native}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")
