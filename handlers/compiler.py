"""``--compile``'s set-up: where Inductor keeps what it compiled; what every compiling process pays before its
first graph (importing Dynamo and Inductor, hashing torch's sources for the cache keys) started early, in a
thread, while the data loads and the first batches are checked; and the run's compiled work kept beside its
checkpoints (``torch.compiler.save_cache_artifacts``), so that the run folder carries it to another machine or
past a cleared cache."""

from __future__ import annotations

import functools
import importlib
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import ignite.distributed as idist
import torch
from ignite.engine import Engine, Events

from engine.files import atomic_file
from engine.imports import frozen_imports
from handlers.adapters import inductor_default_cache, skip_unused_triton_key
from handlers.console import write_line
from handlers.feature import RunFeature, RunParts

if TYPE_CHECKING:
    from handlers.run import Run

__all__ = ["ARTIFACTS", "CompiledArtifacts", "compile_cache", "warm_compiler"]

ARTIFACTS = "compile_artifacts.bin"  # in the run's folder, beside checkpoints/


def compile_cache() -> Path:
    """Where ``torch.compile`` keeps what it compiled (Inductor's on-disk caches: graphs, kernels,
    autotuning), so that a second run of the same model and shapes reuses it: ``$TORCHINDUCTOR_CACHE_DIR``
    if you set it, else ``$XDG_CACHE_HOME/ignite-trainer/compile`` (``~/.cache/...``, not a temporary folder
    that a reboot empties), set for this process."""
    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if given and os.path.abspath(given) != inductor_default_cache():
        return Path(given)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = base / "ignite-trainer" / "compile"
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    return folder


def _warm() -> None:
    if not torch.cuda.is_available():  # its "No CUDA runtime is found, using CUDA_HOME=..." says nothing on a CPU
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    # Dynamo, Inductor, and torch's C++ extension module (setuptools: Inductor's C++ builder, at the first graph),
    # without the collector rescanning what they create (as torch's own import: engine/imports.py)
    with frozen_imports():
        for module in ("torch._dynamo", "torch._inductor.compile_fx", "torch.utils.cpp_extension"):
            importlib.import_module(module)
    from torch._inductor.codecache import CacheBase, torch_key

    torch._dynamo.list_backends()  # imports every backend, as the first graph would
    torch_key()  # cached for the process: the first graph finds it
    CacheBase.get_system()


@functools.cache
def _warming() -> threading.Thread:
    """The process's one warming thread, started at the first call."""
    skip_unused_triton_key()
    thread = threading.Thread(target=_warm, name="warm-compiler", daemon=True)
    thread.start()
    return thread


def warm_compiler() -> threading.Thread:
    """Start the compiler's per-process costs in a daemon thread (~1 s on a 2-core CPU: the imports, the hash of
    torch's sources); the first compiled call finds them done, or waits on the import lock for the rest. On a
    machine without CUDA, Inductor's hash of Triton's files (which no cache key there holds) is skipped. Once a
    process: a second call returns the first call's thread."""
    compile_cache()
    return _warming()


class CompiledArtifacts(RunFeature):
    """With ``--compile``: the run's compiled graphs and kernels (``torch.compiler.save_cache_artifacts()``: the
    FX graph and AOTAutograd cache entries, and with ``TORCH_CACHING_PRECOMPILE=1`` Dynamo's own, which spares
    the next process the tracing too) written to ``compile_artifacts.bin`` in the run's folder after each epoch
    that compiled something new, and when a run stops inside an epoch (rank 0; a run whose graphs all came from
    the cache compiled nothing, and writes no file: torch records what it compiles, not what it finds). A run
    started in a folder that holds the file (``--resume``) loads it into the cache first
    (``load_cache_artifacts``): its graphs come from there even where the cache folder is empty. A file that
    cannot be read is one line, and the run compiles afresh."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.written = 0  # artifacts this process had compiled when the file was last written (or the run began)

    @classmethod
    def of(cls, parts: RunParts) -> CompiledArtifacts | None:
        return cls() if parts.settings.compile else None

    def after_attach(self, run: Run, parts: RunParts) -> None:
        self.start(Path(run.output_dir) / ARTIFACTS)
        if idist.get_rank() == 0:
            run.trainer.add_event_handler(Events.EPOCH_COMPLETED, self.save)  # after the validation: its graph too
            run.trainer.add_event_handler(Events.TERMINATE, self.save)  # a run stopped inside an epoch

    def start(self, path: Path) -> None:
        """The run's file: loaded if there is one; from now on written when this process has compiled more than
        it had (torch keeps one record a process: a process that compiled before writes that work too)."""
        self.path = path
        if path.is_file():
            self.load(path)
        self.written = _count(torch.compiler.save_cache_artifacts())

    @staticmethod
    def load(path: Path) -> bool:
        """Put the file's artifacts into the compile cache; whether they were."""
        torch_log = logging.getLogger("torch.compiler._cache")  # its traceback for a damaged file: our line instead
        level = torch_log.level
        torch_log.setLevel(logging.CRITICAL)
        try:
            if torch.compiler.load_cache_artifacts(path.read_bytes()) is not None:
                return True
            why = "damaged, or written by another torch"
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
        finally:
            torch_log.setLevel(level)
        write_line(f"warning: {path} could not be loaded ({why}); compiling afresh")
        return False

    def save(self, engine: Engine | None = None) -> None:
        """Write what this process compiled, if it compiled more than the file holds (nothing, when every graph
        came from the cache)."""
        saved = torch.compiler.save_cache_artifacts()
        count = _count(saved)
        if saved is not None and self.path is not None and count > self.written:
            with atomic_file(self.path, "wb", suffix=".bin") as f:
                f.write(saved[0])
            self.written = count


def _count(saved: tuple | None) -> int:
    """How many artifacts ``torch.compiler.save_cache_artifacts()`` returned."""
    return 0 if saved is None else sum(len(keys) for keys in saved[1].artifacts.values())
