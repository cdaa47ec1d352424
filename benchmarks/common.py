"""Helpers shared by the benchmarks: where MNIST is, the example script as a module, quiet runs."""

from __future__ import annotations

import contextlib
import io
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

import train_mnist  # noqa: E402,F401  (re-exported for the benchmarks)


def mnist_root() -> str:
    """$MNIST_ROOT, else ../shared/data beside the checkout, else ./data."""
    for candidate in (os.environ.get("MNIST_ROOT"), ROOT.parent / "shared" / "data", ROOT / "data"):
        if candidate and (Path(candidate) / "MNIST" / "raw").is_dir():
            return str(candidate)
    sys.exit("MNIST not found: set MNIST_ROOT to a folder holding MNIST/raw")


@contextlib.contextmanager
def quiet():
    """Swallow stdout (the runs' console lines) while timing."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")
