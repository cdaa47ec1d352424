"""Where a run's tensors live, decided once per process (:func:`process_device`), and the model moved there.

Every path of a run (loaders, checks, metrics, images, the LR finder, EMA, evaluate, predict,
checkpoints, the RNG state) asks the run's :class:`RunDevice` instead of guessing from what CUDA
the machine has: a process that trains on the CPU of a GPU machine never touches its GPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import ignite.distributed as idist
import torch
from torch import nn

from engine.errors import ConfigError, param

__all__ = ["RunDevice", "available_memory", "check_processes", "keep_off_gpus", "model_device", "process_backend",
           "process_device", "resolve_device", "returned_home", "send_home"]


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """Return the device to use: ``name`` if given, else CUDA, then MPS, then CPU.

    Args:
        name: ``"auto"``/``None`` for automatic choice, or any ``torch.device`` string.

    Raises:
        ConfigError: the name is not a device, or that device is not available here.
    """
    if isinstance(name, torch.device):
        return name
    if name is None or name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here: "
                          f"use {param('device', 'cpu')} or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError(f"device {name!r} asked for, but MPS is not available here: "
                          f"use {param('device', 'cpu')} or auto")
    return device


def _gpus() -> int:
    """GPUs this process can see (no CUDA context is made: ``device_count`` asks NVML first)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _too_many(processes: int, gpus: int, where: str) -> ConfigError:
    return ConfigError(f"{where} {processes} processes on this machine, which has {gpus} GPU(s): each process "
                       f"trains on a GPU of its own; use {param('nproc_per_node', min(gpus, processes) or 1)} "
                       f"(or fewer), or {param('device', 'cpu')} for {processes} CPU processes (gloo)")


def check_processes(device: str | torch.device | None, processes: int) -> None:
    """Before ``processes`` processes are started on this machine for ``device``: on CUDA, one GPU
    each, or one line (a :class:`ConfigError`) naming how many GPUs there are and the ways out."""
    if processes > 1 and resolve_device(device).type == "cuda" and processes > _gpus():
        raise _too_many(processes, _gpus(), f"{param('nproc_per_node')} {processes} asks for")


def keep_off_gpus() -> bool:
    """Hide the machine's GPUs from this process and the processes it starts (``CUDA_VISIBLE_DEVICES``
    empty), before CUDA starts here: for the processes of a run on the CPU of a GPU machine. Without it
    their collectives would run on GPU 0 (Ignite's ``idist.device()`` is a GPU whenever CUDA is there,
    whatever the backend), every process making a CUDA context there. Whether it could still be done."""
    if torch.cuda.is_initialized():
        return False
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return True


@dataclass(frozen=True)
class RunDevice:
    """The one owner of where a run's tensors live: decided once per process by :meth:`of`.

    ``device`` is where the model, the batches and the metrics' sums are; ``backend`` is the process
    group's (NCCL on CUDA, gloo elsewhere); ``generator_device`` is the device whose random generator
    the run draws from besides the CPU's (its state goes into checkpoints), ``None`` off CUDA.
    """

    device: torch.device

    @classmethod
    def of(cls, name: str | torch.device | None = "auto", *, local_rank: int = 0,
           local_world_size: int = 1) -> RunDevice:  # fmt: skip
        """``name`` resolved (:func:`resolve_device`); in a launched run on CUDA, the GPU of this
        process's ``local_rank``. More processes on this machine than GPUs: one line from each."""
        device = resolve_device(name)
        if device.type == "cuda" and local_world_size > 1:
            if local_world_size > _gpus():
                raise _too_many(local_world_size, _gpus(), "the launcher started")
            device = torch.device("cuda", local_rank)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return cls(device)

    @property
    def type(self) -> str:
        return self.device.type

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def backend(self) -> str:
        return "nccl" if self.is_cuda else "gloo"

    @property
    def defer_reads(self) -> bool:
        """Whether reading a result on the host makes it wait for the device (CUDA: the host would stop
        queueing work until the step is done). Then the run's handlers read losses at the console's
        cadence and at epoch ends only, never on an ordinary iteration."""
        return self.is_cuda

    @property
    def generator_device(self) -> torch.device | None:
        return self.device if self.is_cuda else None

    def activate(self) -> RunDevice:
        """Make ``device`` this process's current CUDA device (a no-op elsewhere)."""
        if self.is_cuda:
            torch.cuda.set_device(self.device)
        return self


def process_device(name: str | torch.device | None = "auto") -> RunDevice:
    """This process's :class:`RunDevice`, made current: the one builder every caller uses (the run, the
    launcher before its process group forms, ``attach_run`` given none). In a distributed run on CUDA
    it is the GPU of this process's local rank, read from the process group once it is formed, else from
    the launcher's environment (``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``: torchrun's, and ``--nproc-per-node``'s)."""
    if idist.get_world_size() > 1:
        local_rank, local_world_size = idist.get_local_rank(), idist.get_nproc_per_node()
    else:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return RunDevice.of(name, local_rank=local_rank, local_world_size=local_world_size).activate()


def process_backend(name: str | torch.device | None = "auto") -> str:
    """The process group's backend for a run on ``name`` (NCCL on CUDA, gloo elsewhere), decided without
    starting CUDA here: a parent about to fork its ranks must not."""
    return "nccl" if resolve_device(name).type == "cuda" else "gloo"


def model_device(model: nn.Module) -> torch.device:
    """Where ``model`` is: its first parameter's (or buffer's) device; the CPU for a model with neither."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def send_home(model: nn.Module, optimizer: torch.optim.Optimizer | None, device: torch.device) -> None:
    """``model`` (in place) and ``optimizer``'s state onto ``device``, with PyTorch's own rules for the
    state (``Optimizer.load_state_dict``: moments beside their parameters, step counts as they were)."""
    if model_device(model) == device:
        return
    model.to(device)
    if optimizer is not None and optimizer.state:
        optimizer.load_state_dict(optimizer.state_dict())


@contextlib.contextmanager
def returned_home(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> Iterator[None]:
    """Within this block the model may move (to the run's device); after it, however the block ends,
    the model and the optimizer's state are back on the device the model came from."""
    home = model_device(model)
    try:
        yield
    finally:
        send_home(model, optimizer, home)


def available_memory(device: torch.device) -> int:
    """Bytes free for new tensors on ``device``: the GPU's free memory, else the machine's available RAM
    (``MemAvailable`` on Linux; elsewhere free pages)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: assume it fits
