"""The process group of a launched run, and what to do when one of its processes dies.

torchrun restarts a failed group with the same store: the process group of each attempt lives
under its own key prefix here (``TORCHELASTIC_RESTART_COUNT``), so a restarted rank never reads
the address of a process that no longer exists (seen: every restart failing with "Gloo
connectFullMesh failed ... Connection refused" when it did). When a peer dies, the survivors
find out which rank is gone through the same store (:func:`missing_ranks`); a peer on the same
machine whose process has already ended is known gone at once, without waiting for its answer.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch.distributed as dist

from engine.errors import ConfigError

__all__ = ["PeerLost", "PerRank", "attempt", "destroy", "ended_ranks", "init_process_group", "is_peer_failure",
           "missing_ranks"]

_store: dist.Store | None = None


class PeerLost(RuntimeError):
    """Another process of the run died (or its connection did): this one cannot go on."""

    def __init__(self, ranks: list[int], rank: int) -> None:
        self.ranks, self.rank = ranks, rank
        who = f"rank {ranks[0]}" if len(ranks) == 1 else ("ranks " + ", ".join(map(str, ranks)) if ranks
                                                          else "another process")
        super().__init__(f"{who} of the run failed; rank {rank} stops too")


class PerRank:
    """Wraps an object whose state differs between the processes of a run (the RNG streams, the
    data order, ...): ``state_dict()`` gathers every rank's state (a collective: every rank calls it,
    as every rank runs the checkpoint handler) so the one file rank 0 writes holds them all, and
    ``load_state_dict()`` gives each rank its own. A state saved by another number of processes is
    refused with one line naming both."""

    def __init__(self, obj: Any, name: str = "state") -> None:
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise TypeError(f"{type(obj).__name__} has no state_dict/load_state_dict")
        self.obj, self.name = obj, name

    def state_dict(self) -> dict[str, Any]:
        state = self.obj.state_dict()
        ranks = idist.all_gather(state) if idist.get_world_size() > 1 else [state]
        return {"world_size": len(ranks), "ranks": ranks}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "ranks" not in state:  # written before states were kept per rank: the same for every rank
            self.obj.load_state_dict(state)
            return
        saved, world = int(state["world_size"]), idist.get_world_size()
        if saved != world:
            raise ConfigError(
                f"the checkpoint was written by a run of {saved} process(es) and its {self.name} differs between "
                f"them; this run has {world}: resume it with {saved} (torchrun --nproc-per-node / --nnodes, or "
                f"--nproc-per-node {saved})"
            )
        self.obj.load_state_dict(state["ranks"][idist.get_rank()])


def attempt() -> int:
    """Which start of the group this is (0 first; torchrun counts its restarts)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def init_process_group(backend: str, timeout: timedelta | None = None) -> None:
    """The default process group from the launcher's environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``), on the launcher's store under this attempt's prefix."""
    global _store
    from torch.distributed import rendezvous

    kwargs = {"timeout": timeout} if timeout is not None else {}
    store, rank, world = next(rendezvous("env://", **kwargs))
    _store = dist.PrefixStore(f"engine/attempt_{attempt()}", store)
    _store.set(f"process/{rank}", _process_id())
    dist.init_process_group(backend, store=dist.PrefixStore("pg", _store), rank=rank, world_size=world, **kwargs)


def _process_id() -> str:
    """This process as a peer on the same machine can look it up: the kernel's boot, the pid namespace
    and the pid (``""`` where there is no ``/proc``: off Linux)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot} {os.readlink('/proc/self/ns/pid')} {os.getpid()}"
    except OSError:
        return ""


def _ended(rank: int, here: str) -> bool:
    """Whether ``rank``'s process is known to have ended: it runs on this machine, in this pid
    namespace, and its pid is gone or a zombie (killed, not yet reaped by its launcher)."""
    if not here or not _store.check([f"process/{rank}"]):
        return False
    boot, namespace, pid = (_store.get(f"process/{rank}").decode().split(" ") + ["", "", ""])[:3]
    if f"{boot} {namespace}" != here.rsplit(" ", 1)[0] or not pid.isdigit():
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another process went away, or this process's
    DataLoader workers killed by the launcher as it ends the group after another process died."""
    if _workers_stopped(exc):
        return bool(ended_ranks())
    backend_error = getattr(dist, "DistBackendError", ())
    if backend_error and isinstance(exc, backend_error):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc)
    return any(s in text for s in ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
                                   "gloo/transport", "NCCL communicator was aborted", "Socket Timeout"))


def ended_ranks() -> list[int]:
    """The other ranks whose processes are known to have ended (on this machine), without waiting."""
    if _store is None or not dist.is_initialized():
        return []
    here, rank = _process_id(), dist.get_rank()
    try:
        return [r for r in range(dist.get_world_size()) if r != rank and _ended(r, here)]
    except (RuntimeError, OSError):
        return []


def _workers_stopped(exc: BaseException) -> bool:
    """A DataLoader worker of this process killed or gone (a launcher's signal to the process group)."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and "DataLoader worker" in text and (
        "killed by signal" in text or "exited unexpectedly" in text)


def missing_ranks(wait_s: float = 3.0) -> list[int]:
    """After a failed collective: every surviving rank says so in the store, then waits up to
    ``wait_s`` for the others, or until each one still silent is known to have ended (a process on
    this machine that is gone); the ranks that never answered (sorted). ``[]`` if unknown (no store)."""
    if _store is None or not dist.is_initialized():
        return []
    rank, world, here = dist.get_rank(), dist.get_world_size(), _process_id()
    try:
        _store.set(f"alive/{rank}", "1")
        deadline = time.monotonic() + wait_s
        missing = [r for r in range(world) if r != rank]
        while missing and time.monotonic() < deadline:
            missing = [r for r in missing if not _store.check([f"alive/{r}"])]
            if missing and all(_ended(r, here) for r in missing):
                break
            if missing:
                time.sleep(0.05)
        return missing
    except (RuntimeError, OSError):  # the store's host is gone too
        return []


def destroy() -> None:
    """Tear the process group down (idempotent)."""
    global _store
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _store = None
