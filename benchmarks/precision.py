"""Does ``--amp auto`` pick the faster precision? Its choice against timed training in fp32 and in bf16.

Two models on the device found (a GPU, else the CPU): the default recipe's CNN on MNIST at batch 128,
and a compute-heavy one, a wide CNN on synthetic CIFAR-shaped images (3x32x32) at batch 512 (smaller on
a CPU). For each: ``--steps`` training steps of the engine's own step (forward, loss, backward, Adam),
the device synchronised around them, in each precision, alternating over ``--rounds``; then the run
``build_run`` makes with ``amp="auto"`` and what it chose (and, on a GPU, the timings it measured).

    python benchmarks/precision.py [--rounds 3] [--steps 50]

Last line per model: <model>: auto=<choice> chosen/faster=<ratio> (1.000: it picked the faster)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from common import machine, mnist_cnn, mnist_root, mnist_tensors, quiet
from torch import nn

from engine import RunSettings, create_trainer
from engine.amp import native_precisions
from handlers import build_run


def wide_cnn(width: int) -> nn.Module:
    """Conv-BN-ReLU blocks, wide: most of a step is arithmetic, where bf16 should pay."""
    def block(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]

    w = width
    return nn.Sequential(*block(3, w), *block(w, 2 * w, 2), *block(2 * w, 2 * w), *block(2 * w, 4 * w, 2),
                         *block(4 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, 10))


def step_seconds(model_fn, x: torch.Tensor, y: torch.Tensor, amp: str | None, steps: int,
                 device: torch.device) -> float:  # fmt: skip
    torch.manual_seed(0)
    model = model_fn().to(device).to(memory_format=torch.channels_last)
    trainer = create_trainer(model, torch.optim.Adam(model.parameters(), 1e-3), nn.CrossEntropyLoss(), device=device,
                             amp=amp, channels_last=True)
    batches = [(x, y)] * steps
    trainer.run(batches[:3], max_epochs=1)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    trainer.run(batches, max_epochs=1)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def auto_choice(model_fn, x: torch.Tensor, y: torch.Tensor, batch: int, device: torch.device, out: str) -> tuple:
    with quiet():
        run = build_run(model_fn(), (x.cpu(), y.cpu()), (x[:64].cpu(), y[:64].cpu()),
                        RunSettings(output_dir=out, amp="auto", device=str(device), batch_size=batch, epochs=1,
                                    channels_last=True, progress=False, tensorboard=False))  # fmt: skip
    run.close()
    return run.config["precision"], run.config.get("precision_choice")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    print(f"device: {torch.cuda.get_device_name(device) if gpu else machine()}; torch {torch.__version__}")
    train = mnist_tensors(mnist_root())[0]
    g = torch.Generator().manual_seed(0)
    batch = 512 if gpu else 64
    cifar = torch.rand(batch * 4, 3, 32, 32, generator=g), torch.randint(0, 10, (batch * 4,), generator=g)
    models = {"default recipe (MNIST, batch 128)": (mnist_cnn, train[0][:128 * 4], train[1][:128 * 4], 128),
              f"wide CNN (3x32x32, batch {batch})": (lambda: wide_cnn(128 if gpu else 32), *cifar, batch)}
    candidates = [None] + (["bf16"] if "bf16" in native_precisions(device) else [])
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, (model_fn, x, y, size)) in enumerate(models.items()):
            xb, yb = x[:size].to(device), y[:size].to(device)
            times: dict[str, list[float]] = {a or "fp32": [] for a in candidates}
            for r in range(args.rounds):
                for amp in candidates if r % 2 == 0 else candidates[::-1]:
                    times[amp or "fp32"].append(step_seconds(model_fn, xb, yb, amp, args.steps, device))
            ms = {a: statistics.median(t) * 1e3 for a, t in times.items()}
            chosen, measured = auto_choice(model_fn, x, y, size, device, f"{tmp}/auto{k}")
            faster = min(ms, key=ms.get)
            print(f"{name}: a step {', '.join(f'{a} {v:.3f} ms' for a, v in ms.items())}; --amp auto chose {chosen}"
                  + (f" (it measured fp32 {measured['fp32_ms']:.3f}, bf16 {measured['bf16_ms']:.3f} ms)"
                     if measured else " (by rule)"), flush=True)  # fmt: skip
            lines.append(f"{name}: auto={chosen} chosen/faster={ms[chosen] / ms[faster]:.3f}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
