"""No handler of ours makes the host wait for the device on an ordinary iteration: counted on the CPU, every call
that would wait for a GPU (``item``, ``bool``, ``float``, ``int``, ``cpu``, ``tolist``, ``numpy``, ``nonzero``)
made by the trainer's event handlers, in a default run with the policy a GPU gets (``RunDevice.defer_reads``).
On a GPU, tests/test_gpu.py checks the same with torch's own detector over the whole step."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from ignite.engine import Events
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from engine import RunSettings
from engine.device import RunDevice
from handlers import fit, seed_everything

WAITS = {"item", "__bool__", "__float__", "__int__", "__index__", "cpu", "tolist", "numpy", "nonzero"}
EVENTS = (Events.GET_BATCH_STARTED, Events.GET_BATCH_COMPLETED, Events.ITERATION_STARTED, Events.ITERATION_COMPLETED)


class Reads(TorchFunctionMode):
    """Counts the calls that would wait for a GPU."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in WAITS:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


class CountReads:
    """Attached after every handler of ours: from then on, each iteration's events run under :class:`Reads`."""

    def __init__(self) -> None:
        self.by_iteration: dict[int, Counter] = {}

    def attach(self, trainer) -> CountReads:
        fire = trainer._fire_event  # the engine's own dispatch of an event to its handlers (a test's look inside)

        def counted(event, *args, **kwargs):
            if event not in EVENTS:
                return fire(event, *args, **kwargs)
            reads = Reads()
            with reads:
                result = fire(event, *args, **kwargs)
            self.by_iteration.setdefault(trainer.state.iteration, Counter()).update(reads.calls)
            return result

        trainer._fire_event = counted
        return self


def test_our_handlers_wait_for_the_device_only_at_the_console_s_cadence(tmp_path, monkeypatch):
    monkeypatch.setattr(RunDevice, "defer_reads", property(lambda self: True))  # a GPU's policy, here on the CPU
    seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3200, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long()
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Flatten(), torch.nn.Dropout(0.1), torch.nn.Linear(144, 2))  # fmt: skip
    counter = CountReads()
    settings = RunSettings(output_dir=str(tmp_path / "r"), epochs=1, batch_size=32, scheduler="onecycle", ema=0.99,
                           log_every=25, progress=False)  # TensorBoard, checkpoints, early stopping: defaults
    result = fit(model, (x, y), (x[:320], y[:320]), settings, handlers=[counter])
    assert result.exit_code == 0 and max(counter.by_iteration) == 100
    cadence = {i for i in counter.by_iteration if i and i % 25 == 0}
    ordinary = {i: dict(c) for i, c in counter.by_iteration.items() if i not in cadence and c}
    assert ordinary == {}, ordinary  # iteration -> the calls that would have waited
    assert all(counter.by_iteration[i] for i in cadence)  # the count sees the reads the console's lines make


@pytest.mark.parametrize("defer, expected", [(False, 1), (True, 0)])
def test_the_nan_guard_reads_the_loss_every_iteration_only_where_that_costs_nothing(tmp_path, monkeypatch, defer,
                                                                                     expected):
    monkeypatch.setattr(RunDevice, "defer_reads", property(lambda self: defer))
    counter = CountReads()
    x = torch.randn(320, 4)
    fit(torch.nn.Linear(4, 2), (x, (x[:, 0] > 0).long()), (x[:32], (x[:32, 0] > 0).long()),
        RunSettings(output_dir=str(tmp_path / "r"), epochs=1, batch_size=32, log_every=0, progress=False,
                    tensorboard=False), handlers=[counter])  # fmt: skip
    per_iteration = {sum(c.values()) for i, c in counter.by_iteration.items() if i % 10}  # not at the epoch's end
    assert per_iteration == {expected}


class Kernels(TorchDispatchMode):
    """Counts the operators that compute (a GPU's kernel launches); views and metadata left out."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and func not in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def test_on_a_gpus_policy_an_ordinary_iteration_s_handlers_launch_one_kernel(tmp_path, monkeypatch):
    """Over an iteration's events, the NaN guard's deferred record is the inputs' sum (the losses are held as
    they are), the train metrics append; everything else waits for the console's cadence (25 here) or the
    groups' (50)."""
    monkeypatch.setattr(RunDevice, "defer_reads", property(lambda self: True))
    kernels: dict[int, Counter] = {}

    class CountKernels:
        def attach(self, trainer) -> None:
            fire = trainer._fire_event

            def counted(event, *args, **kwargs):
                if event not in EVENTS:
                    return fire(event, *args, **kwargs)
                with Kernels() as mode:
                    result = fire(event, *args, **kwargs)
                kernels.setdefault(trainer.state.iteration, Counter()).update(mode.ops)
                return result

            trainer._fire_event = counted

    x = torch.randn(3200, 4)
    fit(torch.nn.Linear(4, 2), (x, (x[:, 0] > 0).long()), (x[:32], (x[:32, 0] > 0).long()),
        RunSettings(output_dir=str(tmp_path / "r"), epochs=1, batch_size=32, log_every=25, progress=False),
        handlers=[CountKernels()])  # fmt: skip
    ordinary = {i: dict(ops) for i, ops in kernels.items() if i % 25}
    assert len(ordinary) == 96 and all(ops == {"aten.sum": 1} for ops in ordinary.values()), ordinary
