"""Engine overhead: the library's run (``build_run``) with every default handler vs a hand-written loop.

Both do the same work: the default preset's model, batches (same seed), optimizer and one-cycle LR,
per-sample train loss/accuracy, the seed-style lines, and a full validation after each epoch. The
engine run additionally checkpoints, writes history.json and TensorBoard events, guards against
NaN and listens for stop signals, as it does by default.

This machine's speed drifts by tens of percent over seconds, so whole runs timed one after the
other compare badly. Instead both runs advance side by side in one process, in alternating
segments of ``--segment`` iterations (the engine is paused with Ignite's ``interrupt()``, the raw
loop is a generator): A B A B ... Each pair of runs gives one ratio, the sum of the engine's
segments (plus its end-of-run work) over the sum of the raw loop's; the result is the median over
``--pairs`` pairs.

    python benchmarks/overhead.py [--pairs 7] [--epochs 1] [--segment 20]

Last line: overhead_ratio=<engine/raw>
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Iterator

import torch
from ignite.engine import Events
from ignite.handlers import PiecewiseLinear
from torch import nn

from common import machine, mnist_cnn, mnist_root, mnist_tensors, quiet

from engine import RunSettings
from handlers import build_run, make_loaders, seed_everything


def default_settings(epochs: int, out: str | None = None) -> RunSettings:
    """The default preset's recipe (examples/train_mnist.py), every default handler on; full precision
    on both sides, so that both do the same arithmetic whatever the CPU."""
    return RunSettings(output_dir=out, epochs=epochs, batch_size=128, val_batch_size=2000, lr=1e-2,
                       scheduler="onecycle", channels_last=True, progress=False, seed=0, amp="fp32")


class EngineRun:
    """The library's run (``handlers.build_run``, as ``fit`` builds it) on the default recipe."""

    def __init__(self, data: list, epochs: int, out: str, segment: int) -> None:
        seed_everything(0)
        with quiet():
            self.run = build_run(mnist_cnn(), data[0], data[1], default_settings(epochs, out), name="bench")
        self.run.trainer.add_event_handler(Events.ITERATION_COMPLETED(every=segment), lambda e: e.interrupt())
        self.done = False

    def step(self) -> None:
        """Run until the next pause, or to the end (then write the last records, as ``fit`` does)."""
        with quiet():
            self.run.trainer.run(self.run.train_loader, max_epochs=self.run.settings.epochs)
            if self.run.done:
                assert self.run.finish().exit_code == 0
                self.done = True


def raw_loop(data: list, epochs: int, segment: int) -> Iterator[None]:
    """The same training, written by hand; pauses (yields) every ``segment`` iterations."""
    with quiet():
        settings = default_settings(epochs)
        torch.manual_seed(settings.seed)
        train_loader, val_loader = make_loaders(data[0], data[1], settings, torch.device("cpu"))
        model = mnist_cnn().to(memory_format=torch.channels_last)
        optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
        criterion = nn.CrossEntropyLoss()
        total = settings.epochs * len(train_loader)
        lr = settings.lr
        lrs = [v for _, v in PiecewiseLinear.simulate_values(
            total, param_name="lr", milestones_values=[(0, lr / 25), (total // 4, lr), (total - 1, lr / 1e4)])]
    step = 0
    for epoch in range(1, settings.epochs + 1):
        model.train()
        loss_sum, correct, seen = torch.zeros(()), torch.zeros((), dtype=torch.long), 0
        for batch, (x, y) in enumerate(train_loader, 1):
            optimizer.param_groups[0]["lr"] = lrs[step]
            step += 1
            x = x.contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad(set_to_none=True)
            out = model(x)
            loss = criterion(out, y)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * y.shape[0]
            correct += (out.detach().argmax(1) == y).sum()
            seen += y.shape[0]
            if batch % 50 == 0:
                _ = f"Epoch {epoch}, Batch {batch}, Train Loss: {loss_sum.item() / seen:.4f}, " \
                    f"Train Accuracy: {correct.item() / seen * 100:.2f}%"
            if step % segment == 0:
                yield
        _ = f"Epoch {epoch}, Train Loss: {loss_sum.item() / seen:.4f}, Train Accuracy: {correct.item() / seen:.2%}"
        model.eval()
        val_loss, val_correct, val_seen = 0.0, 0, 0
        with torch.no_grad():
            for x, y in val_loader:
                out = model(x.contiguous(memory_format=torch.channels_last)).float()
                val_loss += criterion(out, y).item() * y.shape[0]
                val_correct += (out.argmax(1) == y).sum().item()
                val_seen += y.shape[0]
        _ = f"Epoch {epoch}, Val Loss: {val_loss / val_seen:.4f}, Val Accuracy: {val_correct / val_seen:.2%}"


def pair(data: list, epochs: int, out: str, segment: int) -> tuple[float, float]:
    """Seconds of the engine and of the raw loop, advanced in alternating segments."""
    engine = EngineRun(data, epochs, out, segment)
    raw = raw_loop(data, epochs, segment)
    t_engine = t_raw = 0.0
    raw_done = False
    while not (engine.done and raw_done):
        if not engine.done:
            start = time.perf_counter()
            engine.step()
            t_engine += time.perf_counter() - start
        if not raw_done:
            start = time.perf_counter()
            raw_done = next(raw, StopIteration) is StopIteration
            t_raw += time.perf_counter() - start
    return t_engine, t_raw


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--epochs", type=int, default=1, help="the default recipe runs one")
    p.add_argument("--segment", type=int, default=20, help="iterations per alternating segment")
    args = p.parse_args()
    data = mnist_tensors(mnist_root())
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        pair(data, 1, f"{tmp}/warmup", args.segment)  # warm-up, not counted
        ratios = []
        for i in range(args.pairs):
            e, r = pair(data, args.epochs, f"{tmp}/run{i}", args.segment)
            ratios.append(e / r)
            print(f"pair {i + 1}: engine {e:.3f} s  raw {r:.3f} s  ratio {e / r:.4f}", flush=True)
    print(f"median engine/raw over {args.pairs} pairs; spread {min(ratios):.4f}..{max(ratios):.4f}")
    print(f"overhead_ratio={statistics.median(ratios):.4f}")


if __name__ == "__main__":
    main()
