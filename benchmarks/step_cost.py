"""The host's cost of one training step: this library with every default handler against a hand-written loop
and plain Ignite (and Lightning, when it is installed: not a dependency), on a nano model whose own compute is
small (Linear 32 -> 10, batches of 64 held in memory, one thread), so that what is measured is the loop around
the step: Python, event dispatch, handlers. The same host work is what a launch-bound GPU step pays.

Every side does the same data work as the library: a new random order each epoch, each batch gathered from the
tensors in memory (``x[idx]``, as a hand-written loop over tensors that shuffles does). ``contiguous`` is the
hand-written loop on contiguous slices in the stored order (no shuffle, no copy), for the gather's own cost.

Each side's training call is timed at two lengths (``--short`` and ``--long`` iterations, one epoch, a tiny
validation set); the slope between them is the cost of a step without the fixed costs (set-up, the epoch's
end, the summary). Rounds alternate the sides (the order rotated each round); each side's slope is divided by
the loop's of the same round, and the median of those ratios over ``--rounds`` rounds is reported (this
machine's speed drifts by tens of percent within minutes: a ratio of two medians taken apart drifts with it).
Then the interleaved measurement: the sides advanced ``--segment`` iterations in turn in one process.

    python benchmarks/step_cost.py [--rounds 5] [--short 100] [--long 2100] [--device cpu|cuda]

Last line: ``ratio_<side>=<side / loop>`` (slopes) and ``interleaved_<side>=<side / loop>`` for the contiguous
loop, plain Ignite, this library and, when installed, Lightning; ``interleaved_library_vs_contiguous``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from common import machine, quiet
from ignite.engine import Engine, Events, create_supervised_evaluator, create_supervised_trainer
from ignite.metrics import Accuracy, Loss
from torch import nn

from engine import RunSettings
from handlers import Run, build_run, seed_everything

BATCH, FEATURES, CLASSES = 64, 32, 10


def data(n_batches: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_batches * BATCH, FEATURES, generator=g)
    return x.to(device), (x[:, :CLASSES].argmax(1)).to(device)


def model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(FEATURES, CLASSES).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Batches:
    """Batches of ``BATCH`` from tensors in memory, as a hand-written loop takes them: in a new random order each
    epoch (the permutation's slice gathered by ``x[idx]``, ``y[idx]`` every step: the same work as the
    library's shuffling loader), or, with ``shuffle=False``, contiguous slices of the stored order (no copy)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, shuffle: bool = True) -> None:
        self.x, self.y, self.shuffle = x, y, shuffle
        self.generator = torch.Generator().manual_seed(0)

    def __len__(self) -> int:
        return len(self.x) // BATCH

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.x, self.y
        if not self.shuffle:
            for i in range(len(self)):
                yield x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH]
            return
        order = torch.randperm(len(x), generator=self.generator).to(x.device)
        for i in range(len(self)):
            idx = order[i * BATCH:(i + 1) * BATCH]
            yield x[idx], y[idx]


def loop_steps(net: nn.Module, x: torch.Tensor, y: torch.Tensor, every: int, shuffle: bool = True) -> Iterator[None]:
    """The hand-written loop: zero_grad, forward, loss, backward, step; per-sample loss and accuracy summed on
    the device (read once, at the end, as a careful hand-written loop does). Pauses every ``every`` steps;
    returns the sums."""
    optimizer, loss_fn = torch.optim.Adam(net.parameters(), lr=1e-3), nn.CrossEntropyLoss()
    total, correct = torch.zeros((), device=x.device), torch.zeros((), device=x.device)
    for i, (xb, yb) in enumerate(Batches(x, y, shuffle), 1):
        optimizer.zero_grad(set_to_none=True)
        out = net(xb)
        loss = loss_fn(out, yb)
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(yb)
        correct += (out.detach().argmax(1) == yb).sum()
        if i % every == 0:
            yield
    return total, correct


def yield_from_all(steps: Iterator[None]) -> Any:
    """Run a generator to its end; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as end:
            return end.value


def loop(n: int, device: torch.device, shuffle: bool = True) -> float:
    """The hand-written loop (:func:`loop_steps`) run through, then a validation pass."""
    x, y = data(n, device)
    vx, vy = data(1, device)
    net = model(device)
    sync(device)
    start = time.perf_counter()
    total, correct = yield_from_all(loop_steps(net, x, y, every=n + 1, shuffle=shuffle))
    with torch.no_grad():
        val = nn.functional.cross_entropy(net(vx), vy)
    float(total), float(correct), float(val)
    sync(device)
    return time.perf_counter() - start


def contiguous(n: int, device: torch.device) -> float:
    """The hand-written loop on contiguous slices, in the stored order: no shuffle, no gather."""
    return loop(n, device, shuffle=False)


def ignite_trainer(x: torch.Tensor, y: torch.Tensor, device: torch.device) -> tuple[nn.Module, Engine, Batches]:
    """Plain Ignite's ``create_supervised_trainer`` (its model, the trainer, the shuffled batches)."""
    net = model(device)
    trainer = create_supervised_trainer(net, torch.optim.Adam(net.parameters(), lr=1e-3), nn.CrossEntropyLoss(),
                                        device=device)
    return net, trainer, Batches(x, y)


def ignite(n: int, device: torch.device) -> float:
    """Plain Ignite: ``create_supervised_trainer`` and an evaluator with loss and accuracy after the epoch."""
    net, trainer, train = ignite_trainer(*data(n, device), device)
    vx, vy = data(1, device)
    evaluator = create_supervised_evaluator(net, {"loss": Loss(nn.CrossEntropyLoss()), "accuracy": Accuracy()},
                                            device=device)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: evaluator.run([(vx, vy)]))
    sync(device)
    start = time.perf_counter()
    trainer.run(train, max_epochs=1)
    sync(device)
    return time.perf_counter() - start


def library_run(x: torch.Tensor, y: torch.Tensor, device: torch.device, out: str) -> Run:
    """This library's run (``build_run`` with every default handler) into ``out``."""
    seed_everything(0)
    settings = RunSettings(output_dir=f"{out}/run", epochs=1, batch_size=BATCH, val_batch_size=BATCH,
                           progress=False, device=str(device), seed=0)
    with quiet():
        return build_run(model(device), (x, y), data(1, device), settings)


def library(n: int, device: torch.device) -> float:
    """This library: ``build_run`` with every default handler (checkpoints, history, TensorBoard, NaN guard,
    stop signals, the stall watchdog, console lines every 50 batches); the ``run.run()`` call is timed."""
    with tempfile.TemporaryDirectory() as out:
        run = library_run(*data(n, device), device, out)
        sync(device)
        start = time.perf_counter()
        with quiet():
            result = run.run()
        sync(device)
        took = time.perf_counter() - start
    assert result.exit_code == 0
    return took


def lightning(n: int, device: torch.device) -> float | None:
    """Lightning with its defaults (no logger, no checkpointing, no progress bar), when it is installed."""
    try:
        import lightning as L
    except ImportError:
        return None

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model(device)

        def training_step(self, batch, _):
            xb, yb = batch
            return nn.functional.cross_entropy(self.net(xb), yb)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    train = Batches(*data(n, device))
    with quiet():
        trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, accelerator=device.type, devices=1)
        start = time.perf_counter()
        trainer.fit(Module(), train)
        took = time.perf_counter() - start
    return took


class Stepped:
    """A side advanced ``segment`` iterations at a time, for :func:`interleaved`: an engine paused by Ignite's
    ``interrupt()`` (the pause counted against it), or the loop as a generator."""

    def __init__(self, name: str, n: int, segment: int, device: torch.device) -> None:
        self.out = tempfile.TemporaryDirectory()
        x, y = data(n, device)
        if name in ("loop", "contiguous"):
            self.gen = loop_steps(model(device), x, y, segment, shuffle=name == "loop")
            return
        if name == "ignite":
            _, engine, loader = ignite_trainer(x, y, device)
        else:
            run = library_run(x, y, device, self.out.name)
            engine, loader = run.trainer, run.train_loader
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=segment), lambda e: e.interrupt())
        self.gen = self._engine(engine, loader)

    @staticmethod
    def _engine(engine: Engine, loader: Any) -> Iterator[None]:
        while True:
            with quiet():
                engine.run(loader, max_epochs=1)
            yield


def interleaved(names: list[str], n: int, segment: int, device: torch.device) -> dict[str, float]:
    """Seconds a step of each side, the sides advanced in turn ``segment`` iterations at a time (the order rotated
    each turn), in the middle of one epoch (its first two and its last segments left out): drift hits all alike."""
    sides = {name: Stepped(name, n, segment, device) for name in names}
    seconds = dict.fromkeys(names, 0.0)
    turns = n // segment - 1  # the last segment would hold the epoch's end
    for turn in range(turns):
        order = names[turn % len(names):] + names[:turn % len(names)]
        for name in order:
            start = time.perf_counter()
            next(sides[name].gen)
            if turn >= 2:
                seconds[name] += time.perf_counter() - start
    for side in sides.values():
        side.out.cleanup()
    return {name: s / ((turns - 2) * segment) for name, s in seconds.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--short", type=int, default=100)
    p.add_argument("--long", type=int, default=2100)
    p.add_argument("--segment", type=int, default=100, help="iterations a turn in the interleaved measurement")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    sides: dict[str, Callable[[int, torch.device], float | None]] = {
        "loop": loop, "contiguous": contiguous, "ignite": ignite, "library": library, "lightning": lightning}
    print(machine())
    for side in sides.values():  # warm-up: imports, allocator, first kernels
        side(args.short, device)
    slopes: dict[str, list[float]] = {name: [] for name in sides}
    ratios: dict[str, list[float]] = {name: [] for name in sides if name != "loop"}
    names = list(sides)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            short, long = sides[name](args.short, device), sides[name](args.long, device)
            if short is not None and long is not None:
                slopes[name].append((long - short) / (args.long - args.short))
        for name in ratios:  # each side against the loop of its own round: the machine's drift between rounds cancels
            if len(slopes[name]) == r + 1:
                ratios[name].append(slopes[name][-1] / slopes["loop"][-1])
    for name, s in slopes.items():
        if s:
            print(f"{name}: {statistics.median(s) * 1e6:.1f} us a step ({', '.join(f'{v * 1e6:.1f}' for v in s)})")
    for name, rs in ratios.items():
        if rs:
            print(f"{name} / loop by round: {', '.join(f'{v:.3f}' for v in rs)}")
    interleaved_ratios: dict[str, list[float]] = {"contiguous": [], "ignite": [], "library": []}
    for _ in range(args.rounds):
        step = interleaved(["loop", "contiguous", "ignite", "library"], args.long, args.segment, device)
        for name in interleaved_ratios:
            interleaved_ratios[name].append(step[name] / step["loop"])
        print("interleaved: " + ", ".join(f"{name} {s * 1e6:.1f} us" for name, s in step.items()))
    for name, rs in interleaved_ratios.items():
        print(f"{name} / loop interleaved: {', '.join(f'{v:.3f}' for v in rs)}")
    by_contiguous = [lib / con for lib, con in zip(interleaved_ratios["library"], interleaved_ratios["contiguous"])]
    print(" ".join([f"ratio_{name}={statistics.median(rs):.3f}" for name, rs in ratios.items() if rs]
                   + [f"interleaved_{name}={statistics.median(rs):.3f}" for name, rs in interleaved_ratios.items()]
                   + [f"interleaved_library_vs_contiguous={statistics.median(by_contiguous):.3f}"]))


if __name__ == "__main__":
    main()
