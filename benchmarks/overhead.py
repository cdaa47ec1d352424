"""Engine overhead: the library's run (``build_run``) with every default handler vs a hand-written loop.

Two recipes, each against its own hand-written loop doing the same work (the same model, batches,
optimizer, LR schedule, per-sample train loss/accuracy and a full validation after each epoch):

- ``default``: the default preset (in-memory tensors, the four-block CNN, batch 128, Adam 1e-2
  one-cycle, channels-last), both in full precision;
- ``seed``: the seed preset against the seed's own loop (DataLoader with per-sample ToTensor +
  Normalize, the seed's CNN with dropout, batch 64, Adam 1e-3, ``loss.item()`` every batch).

The engine run additionally checkpoints, writes history.json and TensorBoard events, guards against
NaN and listens for stop signals, as it does by default.

This machine's speed drifts by tens of percent over seconds, and two processes of the same program
differ by up to 25% here (seen: the same seed loop at 40 and at 55 ms a step in two processes), so
whole runs timed one after the other compare badly. Instead both runs advance side by side in one
process, in alternating segments of ``--segment`` iterations (the engine is paused with Ignite's
``interrupt()``, ~0.1 ms a pause, counted against it; the raw loop is a generator), the order
swapped every round: A B B A A B ... Whichever side starts that schedule is measured slower (A/A on
the 2-core Zen 5, 2026-12-02: 1.0044, 1.0050, 1.0060, 1.0098 when A started, 0.9960, 0.9831,
1.0134, 0.9915 when B did), so every measurement is two pairs of runs, one started by each side,
and its ratio is the sum of the engine's segments (plus its end-of-run work) over the sum of the
raw loop's in both; the result is the median over ``--pairs`` such measurements. ``--null`` runs the
raw loop against itself instead: what the method resolves on the machine at hand (on the 2-core
Zen 3, 8 A/A pairs: 0.966..1.037 in segments of 20 iterations, A B A B; 1.001..1.011 in segments of
5, the first of each round ~0.5% slower, hence the swaps).

    python benchmarks/overhead.py [--recipe default|seed] [--pairs 7] [--epochs 1] [--segment 5] [--null]

Last line: overhead_ratio=<engine/raw> (with ``--null``: null_ratio=<raw/raw>)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Iterator

import torch
from common import machine, mnist_cnn, mnist_datasets, mnist_root, mnist_tensors, quiet, seed_cnn
from ignite.engine import Events
from ignite.handlers import PiecewiseLinear
from torch import nn

from engine import RunSettings
from handlers import build_run, make_loaders, seed_everything

RECIPES = {  # the presets of examples/train_mnist.py; full precision on both sides, whatever the CPU
    "default": dict(batch_size=128, val_batch_size=500, lr=1e-2, beta1=0.7, beta2=0.9, label_smoothing=0.1,
                    scheduler="onecycle", channels_last=True),
    "seed": dict(batch_size=64, val_batch_size=1000, lr=1e-3, scheduler="none", channels_last=False,
                 data_path="torchvision"),
}  # fmt: skip
MODELS = {"default": mnist_cnn, "seed": seed_cnn}


def recipe_settings(recipe: str, epochs: int, limit: int | None, out: str | None = None, device: str = "cpu",
                    amp: str = "fp32", deterministic: bool = False) -> RunSettings:  # fmt: skip
    """The recipe's settings, every default handler on."""
    return RunSettings(output_dir=out, epochs=epochs, progress=False, seed=0, amp=amp, limit_train_batches=limit,
                       device=device, deterministic=deterministic, **RECIPES[recipe])


class EngineRun:
    """The library's run (``handlers.build_run``, as ``fit`` builds it) on a recipe."""

    def __init__(self, recipe: str, data: list, epochs: int, limit: int | None, out: str, segment: int,
                 **options: object) -> None:  # fmt: skip
        seed_everything(0)
        with quiet():
            self.run = build_run(MODELS[recipe](), data[0], data[1],
                                 recipe_settings(recipe, epochs, limit, out, **options), name="bench")
        self.run.trainer.add_event_handler(Events.ITERATION_COMPLETED(every=segment), lambda e: e.interrupt())
        self.run.trainer.add_event_handler(Events.COMPLETED, self._completed)
        self.completed = self.done = False

    def _completed(self, engine: object) -> None:
        self.completed = True  # not ``run.done``: a pause at an epoch's last iteration precedes its end handlers

    def step(self) -> None:
        """Run until the next pause, or to the end (then write the last records, as ``fit`` does)."""
        with quiet():
            self.run.trainer.run(self.run.train_loader, max_epochs=self.run.settings.epochs)
            if self.completed:
                assert self.run.finish().exit_code == 0
                self.done = True


def raw_loop(recipe: str, data: list, epochs: int, limit: int | None, segment: int, device: str = "cpu",
             amp: str = "fp32") -> Iterator[None]:  # fmt: skip
    """The same training, written by hand (the seed's loop for ``seed``); pauses every ``segment`` iterations.
    On ``device`` (the data too, on the in-memory path), in ``amp`` (``"bf16"``: autocast, as the engine's)."""
    with quiet():
        settings = recipe_settings(recipe, epochs, limit)
        torch.manual_seed(settings.seed)
        where = torch.device(device)
        train_loader, val_loader = make_loaders(data[0], data[1], settings, where)
        model = MODELS[recipe]().to(where)
        fmt = torch.channels_last if settings.channels_last else torch.contiguous_format
        model = model.to(memory_format=fmt)
        precision = torch.autocast(where.type, dtype=torch.bfloat16, enabled=amp == "bf16")
        optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, betas=(settings.beta1, settings.beta2))
        criterion = nn.CrossEntropyLoss()  # what both report: the plain cross-entropy
        train_criterion = nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)
        onecycle, seed_loop = settings.scheduler == "onecycle", recipe == "seed"
        total, lr = settings.epochs * len(train_loader), settings.lr
        lrs = [v for _, v in PiecewiseLinear.simulate_values(
            total, param_name="lr", milestones_values=[(0, lr / 25), (total // 4, lr), (total - 1, lr / 1e4)])
        ] if onecycle else []
    step = 0
    for epoch in range(1, settings.epochs + 1):
        model.train()
        loss_sum, correct, seen = torch.zeros((), device=where), torch.zeros((), dtype=torch.long, device=where), 0
        for batch, (x, y) in enumerate(train_loader, 1):
            if onecycle:
                optimizer.param_groups[0]["lr"] = lrs[step]
            step += 1
            x, y = x.to(where, non_blocking=True), y.to(where, non_blocking=True)
            x = x.contiguous(memory_format=fmt)
            optimizer.zero_grad(set_to_none=True)
            with precision:
                out = model(x)
                loss = train_criterion(out, y)
            loss.backward()
            optimizer.step()
            if seed_loop:  # the seed's loop: a Python float every batch
                loss_sum += loss.item() * y.shape[0]
            elif settings.label_smoothing:  # the engine reports the plain cross-entropy of the logits
                with torch.no_grad():
                    loss_sum += criterion(out.float(), y) * y.shape[0]
            else:
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
        with torch.no_grad(), precision:
            for x, y in val_loader:
                x, y = x.to(where, non_blocking=True), y.to(where, non_blocking=True)
                out = model(x.contiguous(memory_format=fmt)).float()
                val_loss += criterion(out, y).item() * y.shape[0]
                val_correct += (out.argmax(1) == y).sum().item()
                val_seen += y.shape[0]
        _ = f"Epoch {epoch}, Val Loss: {val_loss / val_seen:.4f}, Val Accuracy: {val_correct / val_seen:.2%}"


class RawRun:
    """The hand-written loop, stepped like :class:`EngineRun` (for the A/A check: raw against raw)."""

    def __init__(self, recipe: str, data: list, epochs: int, limit: int | None, segment: int) -> None:
        self.loop = raw_loop(recipe, data, epochs, limit, segment)
        self.done = False

    def step(self) -> None:
        self.done = next(self.loop, StopIteration) is StopIteration


def pair(recipe: str, data: list, epochs: int, limit: int | None, out: str, segment: int,
         null: bool = False, raw_starts: bool = False) -> tuple[float, float]:
    """Seconds of the engine (with ``null``, a second raw loop) and of the raw loop, advanced in
    alternating segments, the order swapped every round (A B, B A, A B, ...; with ``raw_starts``
    B A, A B, ...): whichever runs first after a switch is measured ~0.5% slower here, and this way
    neither side always is; which side starts still counts (see the module's docstring)."""
    first = RawRun(recipe, data, epochs, limit, segment) if null else EngineRun(recipe, data, epochs, limit, out,
                                                                              segment)
    sides = [(first, [0.0]), (RawRun(recipe, data, epochs, limit, segment), [0.0])]
    round_ = 0
    while not all(run.done for run, _ in sides):
        for run, seconds in sides if (round_ + raw_starts) % 2 == 0 else sides[::-1]:
            if not run.done:
                start = time.perf_counter()
                run.step()
                seconds[0] += time.perf_counter() - start
        round_ += 1
    return sides[0][1][0], sides[1][1][0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", choices=sorted(RECIPES), default="default")
    p.add_argument("--pairs", type=int, default=7)
    p.add_argument("--epochs", type=int, default=1, help="the default recipe runs one")
    p.add_argument("--limit", type=int, default=None, help="training batches per epoch (default: all)")
    p.add_argument("--segment", type=int, default=5, help="iterations per alternating segment")
    p.add_argument("--null", action="store_true", help="A/A check: the raw loop against itself (expect 1.00)")
    args = p.parse_args()
    data = mnist_tensors(mnist_root()) if args.recipe == "default" else mnist_datasets(mnist_root())
    side = "raw" if args.null else "engine"
    print(f"machine: {machine()}; recipe {args.recipe}, {args.epochs} epoch(s), limit {args.limit}, segments of "
          f"{args.segment}{'; A/A: raw against raw' if args.null else ''}")
    with tempfile.TemporaryDirectory() as tmp:
        pair(args.recipe, data, 1, min(args.limit or 100, 100), f"{tmp}/warmup", args.segment)  # warm-up
        ratios = []
        for i in range(args.pairs):  # two pairs each: one started by the engine, one by the raw loop
            runs = {first: pair(args.recipe, data, args.epochs, args.limit, f"{tmp}/run{i}-{int(first)}",
                                args.segment, args.null, raw_starts=first) for first in (i % 2 == 1, i % 2 == 0)}
            e, r = sum(run[0] for run in runs.values()), sum(run[1] for run in runs.values())
            ratios.append(e / r)
            first, second = ("A", "B") if args.null else (side, "raw")
            (e0, r0), (e1, r1) = runs[False], runs[True]
            halves = f"{first} started {e0 / r0:.4f}, {second} {e1 / r1:.4f}"
            print(f"pair {i + 1}: {side} {e:.3f} s  raw {r:.3f} s  ratio {e / r:.4f}  ({halves})", flush=True)
    print(f"median {side}/raw over {args.pairs} pairs of runs; spread {min(ratios):.4f}..{max(ratios):.4f}")
    print(f"{'null' if args.null else 'overhead'}_ratio={statistics.median(ratios):.4f}")


if __name__ == "__main__":
    main()
