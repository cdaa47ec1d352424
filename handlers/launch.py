"""Launching a run's processes: one here; each rank torchrun started; or ``--nproc-per-node N`` spawned
here as torchrun would start them (:func:`launch`). A rank joins its group, trains and leaves with the
others; another rank dying ends it with one line and :data:`~engine.errors.EXIT_PEER`."""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from typing import Any

import ignite.distributed as idist
import torch

from engine import distributed
from engine.determinism import prepare_environment
from engine.device import check_processes, keep_off_gpus, process_backend, process_device
from engine.errors import EXIT_PEER, ConfigError, flag_names, param
from engine.settings import RunSettings
from handlers.compiler import warm_compiler
from handlers.exits import guarded
from handlers.rng import seed_everything
from handlers.run import RunResult

__all__ = ["PerProcess", "launch", "start_method"]

PerProcess = Callable[[Any], "RunResult | int"]


def _one_process(per_process: PerProcess, settings: RunSettings) -> int:
    seed_everything(settings.seed)  # before the model is built: its initial weights come from it
    if settings.compile:
        warm_compiler()  # while the data loads
    result = per_process(settings)
    return result.exit_code if isinstance(result, RunResult) else int(result or 0)


def _leave_together() -> None:
    """Every rank waits here for the others before the process group is torn down: a rank that tore
    its gloo group down while rank 0 was still writing the last records was seen to abort at exit."""
    if idist.get_world_size() > 1:
        idist.barrier()


def _in_group(per_process: PerProcess, settings: RunSettings, backend: str, quiet: bool = False) -> int:
    """One rank of a launched run: join the group, train, leave together. Another rank dying ends
    this one with one line naming it (none with ``quiet``: the spawning parent says it) and
    :data:`EXIT_PEER`, without a traceback."""
    distributed.init_process_group(backend)
    try:
        code = _one_process(per_process, settings)
        _leave_together()
        return code
    except Exception as exc:
        if not distributed.is_peer_failure(exc):
            raise
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the launcher's SIGTERM must not cut our line off
        if not quiet:
            lost = distributed.PeerLost(distributed.missing_ranks(), idist.get_rank())
            print(f"error: {lost}; checkpoints already saved are intact: continue with {param('resume', 'auto')} "
                  f"(torchrun --max-restarts does it by itself)", file=sys.stderr, flush=True)
        return EXIT_PEER
    finally:
        # The process group lives on in whatever still holds it (DDP's reducer, in a reference cycle
        # of the engines): free that now, while the interpreter is whole. Left to its finalisation, a
        # rank was seen to abort at exit ("terminate called without an active exception", 1 run in ~30).
        gc.collect()  # seen here: without it the DDP model is still alive at this point
        distributed.destroy()


def _spawned(local_rank: int, per_process: PerProcess, settings: RunSettings, flags: dict[str, str],
             env: dict[str, str], backend: str) -> None:  # fmt: skip
    """A process spawned by ``--nproc-per-node``: errors end it with our exit codes, as a script would."""
    os.environ.update(env, RANK=str(local_rank), LOCAL_RANK=str(local_rank))
    with flag_names(flags):
        code = guarded(lambda: _in_group(per_process, settings, backend, quiet=True))
    sys.exit(code)


def _spawn(per_process: PerProcess, settings: RunSettings, flags: dict[str, str], backend: str) -> int:
    """``settings.nproc_per_node`` processes here, each a rank of the run (as torchrun would start them)."""
    from torch.multiprocessing import ProcessExitedException, ProcessRaisedException, start_processes

    n = settings.nproc_per_node
    env = {"WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}  # fmt: skip
    context = start_processes(_spawned, args=(per_process, settings, flags, env, backend), nprocs=n, join=False,
                              start_method=start_method())
    try:
        while not context.join(grace_period=10):  # the others get 10 s to notice and leave by themselves
            pass
    except ProcessExitedException as exc:
        if exc.exit_code > 0:  # it said why itself
            return exc.exit_code
        print(f"error: rank {exc.error_index} of the run (pid {exc.error_pid}) was killed by {exc.signal_name}; "
              f"checkpoints already saved are intact: continue with {param('resume', 'auto')}", file=sys.stderr)
        return EXIT_PEER
    except ProcessRaisedException as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else "a training process failed"
        print(f"error: rank {exc.error_index} of the run failed: {last}", file=sys.stderr)
        return 1
    return 0


def start_method() -> str:
    """How ``--nproc-per-node`` starts its processes: the method set with ``multiprocessing.set_start_method``
    if the program set one; else ``"fork"`` on Linux without any accelerator (each rank starts with
    everything already imported: a 40-batch MNIST run of 2 ranks took 8.2-9.1 s instead of 14.1-14.4 s
    on a 2-core CPU), and ``"spawn"`` anywhere else (CUDA and other devices are not fork-safe, macOS
    frameworks neither). A run on the CPU hides the GPUs from its processes first (``--device cpu``):
    then it forks on a GPU machine too."""
    chosen = multiprocessing.get_start_method(allow_none=True)
    if chosen is not None:
        return chosen
    if sys.platform.startswith("linux") and not _accelerator_present():
        return "fork"
    return "spawn"


def _accelerator_present() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ...
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(per_process: PerProcess, settings: RunSettings, flags: Mapping[str, str] | None = None) -> int:
    """Run ``per_process(settings)`` here, in each process torchrun started, or in
    ``settings.nproc_per_node`` processes spawned here; the exit code of the run."""
    prepare_environment(settings.deterministic)  # before CUDA starts here or in any process started below
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # by torchrun (or another launcher)
    spawning = bool(settings.nproc_per_node and settings.nproc_per_node > 1)
    if spawning and launched:
        raise ConfigError(f"{param('nproc_per_node')} spawns processes itself: do not also launch with torchrun")
    if (spawning or launched) and settings.device == "cpu":
        keep_off_gpus()  # a CPU run's processes (and their collectives) never touch a GPU
    if spawning:
        check_processes(settings.device, settings.nproc_per_node)  # before any process starts
        backend = settings.backend or process_backend(settings.device)  # CUDA not started here
        return _spawn(per_process, settings, dict(flags or {}), backend)
    if launched:  # rank and world from the launcher's environment; every rank says a bad device before the group forms
        return _in_group(per_process, settings, settings.backend or process_device(settings.device).backend)
    return _one_process(per_process, settings)
