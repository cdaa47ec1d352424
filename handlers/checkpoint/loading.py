"""Reading checkpoints back: verified, safe, ours, and restored into live objects with clear errors.

Every record of a checkpoint file (each tensor's bytes, the pickled state, torch's own small records)
gets a CRC-32 from torch's zip writer as it is saved, stored in the archive's directory: that is
the file's integrity record, and it costs the save nothing. ``torch.load`` never checks it, so a
flipped bit inside a tensor loads silently; :func:`verify_checkpoint` checks every record (Python's
``zipfile``) before anything is read, and every load here goes through it.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine
from torch import nn

from engine.errors import CheckpointError
from handlers.adapters import load_engine_state

__all__ = [
    "FORMAT",
    "INTEGRITY",
    "VERSION",
    "find_resume_checkpoint",
    "last_checkpoints",
    "load_checkpoint",
    "check_world_size",
    "restore",
    "verify_checkpoint",
]

FORMAT = "ignite-trainer-checkpoint"
VERSION = 3  # 2: the meta record says how the file is verified and holds the watched metric;
# 3: it holds the world size, and the RNG and data position of every rank
INTEGRITY = "zip-crc32"
_LAST_RE = re.compile(r"^last_iter=(\d+)\.pt$")


def verify_checkpoint(path: str | Path) -> None:
    """Check every record of the file against the CRC-32 that was stored for it when it was saved.

    Raises:
        CheckpointError: missing, empty, not a zip archive, or damaged (a record's bytes changed).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the save was cut off")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every record, compares its CRC-32 with the stored one
            # torch's zip reader takes a record flagged as a folder (DOS attribute 0x10, or a name
            # ending in "/") for an empty one and silently reads zeros: no record of ours is a folder
            bad = bad or next((i.filename for i in archive.infolist() if i.is_dir() or i.external_attr & 0x10), None)
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"checkpoint {path} cannot be read (not a checkpoint archive: {exc})") from None
    except Exception as exc:  # a damaged header can make zipfile fail in many ways
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is damaged ({reason}): do not resume from it") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: record {bad!r} fails its CRC-32 check "
                              f"(its bytes or its entry changed after saving); do not resume from it")


def load_checkpoint(path: str | Path, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Verify a checkpoint (:func:`verify_checkpoint`), read it safely (``weights_only``: no code in
    the file can run) and check it is ours. A file of the older format 1 (same CRCs, no ``integrity``
    marker) is read after the same check, with one line to ``log`` saying so.

    Raises:
        CheckpointError: missing, truncated, damaged, unsafe, or not a checkpoint of this project.
    """
    path = Path(path)
    verify_checkpoint(path)
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for bad bytes: pickle, zip, runtime errors
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            reason = "it holds objects other than tensors and plain data, which are refused for safety"
        raise CheckpointError(f"checkpoint {path} cannot be read ({reason[:200]})") from None
    meta = data.get("meta") if isinstance(data, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this project (no {FORMAT!r} marker)")
    if meta.get("version") not in (1, 2, VERSION):
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('version')}; this code reads 1 to "
                              f"{VERSION}: it was made by a newer version of this project")
    if meta.get("version") == 1 and log is not None:
        log(f"{path} is of the older checkpoint format 1: its CRC-32s were checked as for format {VERSION}")
    missing = [k for k in ("model", "trainer") if k not in data]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}")
    return data


def last_checkpoints(dirname: str | Path) -> list[Path]:
    """``last_iter=*.pt`` files in ``dirname``, newest (highest iteration) first."""
    dirname = Path(dirname)
    if not dirname.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in dirname.iterdir() if (m := _LAST_RE.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def find_resume_checkpoint(dirname: str | Path, log: Callable[[str], None] = print) -> tuple[Path, dict] | None:
    """The newest valid ``last_*.pt`` and its contents; invalid newer files are skipped with a line each.

    Returns ``None`` if there is no ``last_*.pt`` at all. Raises :class:`CheckpointError` if there
    are some but none is valid.
    """
    candidates = last_checkpoints(dirname)
    if not candidates:
        return None
    errors = []
    for path in candidates:
        try:
            return path, load_checkpoint(path, log=log)
        except CheckpointError as exc:
            errors.append(str(exc))
            log(f"Skipping {path.name}: {exc}; trying an older checkpoint")
    raise CheckpointError(f"no valid checkpoint in {dirname}: " + "; ".join(errors))


def check_world_size(checkpoint: Mapping[str, Any], path: str | Path) -> None:
    """Refuse (a :class:`CheckpointError`) a checkpoint written by a run of another number of processes."""
    meta = checkpoint.get("meta")
    saved_world = meta.get("world_size") if isinstance(meta, Mapping) else None
    world = idist.get_world_size()
    if saved_world is not None and int(saved_world) != world:
        raise CheckpointError(
            f"checkpoint {path} was written by a run of {saved_world} process(es), this run has {world}: resume it "
            f"with {saved_world} (torchrun --nnodes x --nproc-per-node = {saved_world}, or --nproc-per-node "
            f"{saved_world}), so that each process gets back its own data position, RNG and metric sums"
        )


def restore(to_load: Mapping[str, Any], checkpoint: Mapping[str, Any], path: str | Path) -> None:
    """Load each object of ``to_load`` from ``checkpoint``; a mismatch becomes one clear error."""
    missing = [k for k in to_load if k not in checkpoint]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}: it was made with other settings")
    check_world_size(checkpoint, path)
    model_state = checkpoint["model"]
    model = to_load.get("model")
    if model is not None:
        _check_model_state(model, model_state, path)
    for key, obj in to_load.items():
        try:
            if isinstance(obj, Engine):
                load_engine_state(obj, checkpoint[key])
                continue
            obj.load_state_dict(checkpoint[key])
        except CheckpointError:
            raise
        except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"checkpoint {path}: cannot restore {key!r} ({first[:200]})") from None


def _check_model_state(model: nn.Module, state: Any, path: str | Path) -> None:
    if not isinstance(state, Mapping):
        raise CheckpointError(f"checkpoint {path}: 'model' is not a state dict")
    own = model.state_dict()
    for name, tensor in own.items():
        if name not in state:
            raise CheckpointError(f"checkpoint {path} is for another model: it has no tensor {name!r}")
        other = state[name]
        if not isinstance(other, torch.Tensor) or other.shape != tensor.shape:
            shape = tuple(other.shape) if isinstance(other, torch.Tensor) else type(other).__name__
            raise CheckpointError(
                f"checkpoint {path} is for another model: tensor {name!r} has shape {shape}, "
                f"this model needs {tuple(tensor.shape)}"
            )
    extra = [k for k in state if k not in own]
    if extra:
        raise CheckpointError(f"checkpoint {path} is for another model: unexpected tensor {extra[0]!r}")
