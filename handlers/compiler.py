"""``--compile``'s set-up: where Inductor keeps what it compiled, and what every compiling process pays before
its first graph (importing Dynamo and Inductor, hashing torch's sources for the cache keys) started early, in
a thread, while the data loads and the first batches are checked."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from handlers.adapters import inductor_default_cache, skip_unused_triton_key

__all__ = ["compile_cache", "warm_compiler"]


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
    import torch._dynamo
    import torch._inductor.compile_fx  # noqa: F401
    from torch._inductor.codecache import CacheBase, torch_key

    torch_key()  # cached for the process: the first graph finds it
    CacheBase.get_system()


def warm_compiler() -> threading.Thread:
    """Start the compiler's per-process costs in a daemon thread (~1 s on a 2-core CPU: the imports, the hash of
    torch's sources); the first compiled call finds them done, or waits on the import lock for the rest. On a
    machine without CUDA, Inductor's hash of Triton's files (which no cache key there holds) is skipped."""
    compile_cache()
    skip_unused_triton_key()
    thread = threading.Thread(target=_warm, name="warm-compiler", daemon=True)
    thread.start()
    return thread
