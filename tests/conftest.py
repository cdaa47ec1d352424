"""Shared fixtures: the real MNIST from $MNIST_ROOT (or ../shared/data), and the example script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "train_mnist.py"


def _mnist_root() -> Path | None:
    for candidate in (os.environ.get("MNIST_ROOT"), ROOT.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "MNIST" / "raw").is_dir():
            return Path(candidate).resolve()
    return None


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The folder holding MNIST/raw. Missing: skipped locally, a failure under CI=true."""
    root = _mnist_root()
    if root is None:
        message = "MNIST not found: set MNIST_ROOT to a folder holding MNIST/raw"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message)
        pytest.skip(message)
    return root


def run_script(*args: str, mnist: Path | None, timeout: float = 600, env: dict | None = None, cwd=None):
    """Run examples/train_mnist.py as a real subprocess; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("MNIST_ROOT", None)
    cmd = [sys.executable, str(SCRIPT), *args]
    if mnist is not None:
        cmd += ["--data-dir", str(mnist)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)
