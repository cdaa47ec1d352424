"""torchvision data sets from a folder, downloaded when missing, and checked: one clear line when not."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from engine.errors import ConfigError, param

__all__ = ["check_classification_data", "dataset_folder", "load_dataset"]

IDX_TYPES = {0x08: "uint8", 0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}


def _is_idx_dataset(cls: type) -> bool:
    import torchvision

    return issubclass(cls, torchvision.datasets.MNIST)


def dataset_folder(cls: type, root: str | Path) -> Path:
    """Where torchvision's ``cls`` keeps its files under ``root`` (``MNIST/raw``, ``cifar-10-batches-py``)."""
    if _is_idx_dataset(cls):
        return Path(root) / cls.__name__ / "raw"
    return Path(root) / getattr(cls, "base_folder", "")


def load_dataset(
    cls: type,
    root: str | Path,
    *,
    train: bool,
    download: bool,
    transform: Callable[[Any], Any] | None = None,
    hint: str = "",
) -> Any:
    """torchvision's ``cls(root, train=train)``, downloaded first when missing and ``download``.

    Raises:
        ConfigError: missing (and not downloadable), unreadable or malformed files, in one line
            naming the folder; ``hint`` is added to the missing-files line (e.g. an environment variable).
    """
    folder = dataset_folder(cls, root).resolve()
    name = cls.__name__
    try:
        return cls(str(root), train=train, download=False, transform=transform)
    except RuntimeError as exc:
        if "not found" not in str(exc):
            raise ConfigError(f"the {name} files in {folder} cannot be read ({str(exc)[:120]})") from None
    except (AssertionError, ValueError, IndexError, TypeError, OSError, EOFError) as exc:
        found = _explain_bad_idx(folder, train) if _is_idx_dataset(cls) else None
        raise ConfigError(found or f"the {name} files in {folder} are malformed "
                          f"({type(exc).__name__}: {str(exc)[:100]})") from None
    if download:
        try:
            return cls(str(root), train=train, download=True, transform=transform)
        except Exception as exc:  # offline, proxy, disk: all end the same way for the user
            reason = f"download failed: {str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}"
    else:
        reason = "downloading is switched off"
    where = f"{folder.parent.name}/{folder.name}" if _is_idx_dataset(cls) else folder.name
    raise ConfigError(f"{name} not found in {folder} ({reason}); put its files there, or point "
                      f"{param('data_dir')}{hint} at a folder holding {where}")


def _explain_bad_idx(raw: Path, train: bool) -> str | None:
    """Name what is wrong with IDX files that torchvision could not read, from their headers."""
    prefix, name = ("train", "training") if train else ("t10k", "test")
    for kind in ("images", "labels"):
        path = raw / f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
        header = path.read_bytes()[:8] if path.is_file() else b""
        if len(header) < 8:
            return f"{path} is not an IDX file (too short)"
        code, count = header[2], int.from_bytes(header[4:8], "big")
        if count == 0:
            return f"the {name} set is empty: {path} holds 0 samples"
        if code != 0x08:
            what = "class labels" if kind == "labels" else "pixels"
            return f"{path} holds {IDX_TYPES.get(code, hex(code))} values; {what} must be uint8"
    return None


def check_classification_data(
    inputs: torch.Tensor, labels: torch.Tensor, name: str, *, num_classes: int, sample_shape: tuple[int, ...]
) -> None:
    """Fail early, in one line, on data a classifier cannot learn from: empty, mismatched lengths,
    inputs not of ``sample_shape``, labels not integers in ``[0, num_classes)``."""
    if inputs.shape[0] == 0:
        raise ConfigError(f"the {name} set is empty: check {param('data_dir')}")
    if inputs.shape[0] != labels.shape[0]:
        raise ConfigError(f"the {name} set has {inputs.shape[0]} inputs but {labels.shape[0]} labels")
    if tuple(inputs.shape[1:]) != tuple(sample_shape):
        shape = "x".join(str(d) for d in sample_shape)
        raise ConfigError(f"the {name} set has inputs of shape {tuple(inputs.shape[1:])}; the model needs {shape}")
    if labels.is_floating_point() or labels.is_complex():
        raise ConfigError(f"the {name} set has {labels.dtype} labels; class labels must be integers")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ConfigError(f"the {name} set has labels in [{low}, {high}]; they must lie in [0, {num_classes - 1}]")
