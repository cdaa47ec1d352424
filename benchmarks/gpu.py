"""The engine against a hand-written loop on a GPU (on the CPU where none is found), in fp32 and in bf16.

The default recipe (MNIST in memory on the device, the four-block CNN, batch 128, Adam one-cycle,
channels-last, one epoch and its validation): the library's run (``build_run``, every default handler:
checkpoints, history, TensorBoard, NaN guard, stop signals) against the loop of benchmarks/overhead.py
doing the same work on the same device (per-sample loss and accuracy, the same schedule, validation).
Whole runs, the device synchronised before and after each, in alternating order (engine first, then the
loop first), after one warm-up of each; per precision the median of the engine/loop ratios. Then the
engine with ``deterministic`` against without, in the precision ``--amp auto`` would choose, alternating.

    python benchmarks/gpu.py [--rounds 3] [--limit N]

Last lines: ratio_fp32=<engine/loop> ratio_bf16=<engine/loop>, deterministic_ratio=<with/without>
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from common import machine, mnist_root, mnist_tensors
from overhead import EngineRun, raw_loop

from engine.amp import native_precisions


def synced(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def engine_seconds(data: list, device: torch.device, amp: str, limit: int | None, out: str, **options) -> float:
    run = EngineRun("default", data, 1, limit, out, segment=10**9, device=str(device), amp=amp, **options)
    start = synced(device)
    while not run.done:
        run.step()
    return synced(device) - start


def loop_seconds(data: list, device: torch.device, amp: str, limit: int | None) -> float:
    start = synced(device)
    for _ in raw_loop("default", data, 1, limit, segment=10**9, device=str(device), amp=amp):
        pass
    return synced(device) - start


def alternate(first, second, rounds: int) -> tuple[list[float], list[float]]:
    """Seconds of ``first()`` and of ``second()`` over ``rounds`` rounds, each round's order swapped."""
    a, b = [], []
    for r in range(rounds):
        if r % 2 == 0:
            a.append(first())
            b.append(second())
        else:
            b.append(second())
            a.append(first())
    return a, b


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--limit", type=int, default=None, help="training batches (default: the whole epoch, 469)")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()
    print(f"device: {where}; torch {torch.__version__}; default recipe, 1 epoch, limit {args.limit}")
    data = mnist_tensors(mnist_root())
    precisions = ["fp32"] + (["bf16"] if "bf16" in native_precisions(device) else [])
    ratios, engine = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        n = iter(range(10**6))
        for amp in precisions:
            engine_seconds(data, device, amp, 50, f"{tmp}/warm{next(n)}")  # warm-up: kernels, allocator, caches
            loop_seconds(data, device, amp, 50)
            e, r = alternate(lambda amp=amp: engine_seconds(data, device, amp, args.limit, f"{tmp}/run{next(n)}"),
                             lambda amp=amp: loop_seconds(data, device, amp, args.limit), args.rounds)  # fmt: skip
            ratios[amp], engine[amp] = statistics.median(x / y for x, y in zip(e, r)), statistics.median(e)
            print(f"{amp}: loop {', '.join(f'{s:.3f}' for s in r)} s; engine {', '.join(f'{s:.3f}' for s in e)} s; "
                  f"engine/loop {', '.join(f'{x / y:.3f}' for x, y in zip(e, r))} (median {ratios[amp]:.3f})",
                  flush=True)
        amp = min(precisions, key=engine.get)  # the faster: what --amp auto picks (on a CPU: by rule, the same here)
        det, plain = alternate(
            lambda: engine_seconds(data, device, amp, args.limit, f"{tmp}/det{next(n)}", deterministic=True),
            lambda: engine_seconds(data, device, amp, args.limit, f"{tmp}/plain{next(n)}"), args.rounds)
        det_ratio = statistics.median(x / y for x, y in zip(det, plain))
        print(f"deterministic ({amp}): with {', '.join(f'{s:.3f}' for s in det)} s; without "
              f"{', '.join(f'{s:.3f}' for s in plain)} s (median ratio {det_ratio:.3f})")
    print(" ".join(f"ratio_{amp}={ratio:.3f}" for amp, ratio in ratios.items())
          + f" deterministic_ratio={det_ratio:.3f}")


if __name__ == "__main__":
    main()
