"""Data path throughput: the in-memory loader vs torchvision's DataLoader (0 and 2 workers).

Each path hands out one epoch of MNIST training batches (the batch size of the default preset)
and the consumer touches every batch (a sum), so nothing is skipped lazily. Rounds alternate
between the paths; the figure per path is the median samples/s over the rounds.

    python benchmarks/data_path.py [--rounds 3] [--batch-size 256]

Last line: speedup=<in-memory / best DataLoader>
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import machine, mnist_root, mnist_tensors
from torch.utils.data import DataLoader
from torchvision import transforms

from engine import RunSettings, load_dataset
from handlers import make_loaders


def samples_per_second(loader) -> float:
    start = time.perf_counter()
    n, check = 0, 0.0
    for x, y in loader:
        check += float(x[:, 0, 0, 0].sum())
        n += y.shape[0]
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    args = p.parse_args()
    root = mnist_root()
    print(f"machine: {machine()}")

    start = time.perf_counter()
    train, test = mnist_tensors(root)
    memory, _ = make_loaders(train, test, RunSettings(batch_size=args.batch_size), torch.device("cpu"))
    print(f"in-memory set-up (read, normalise once): {time.perf_counter() - start:.2f} s")

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    import torchvision

    dataset = load_dataset(torchvision.datasets.MNIST, root, train=True, download=False, transform=tf)
    paths = {
        "in-memory": memory,
        "DataLoader, 0 workers": DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=0),
        "DataLoader, 2 workers": DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=2),
    }
    results: dict[str, list[float]] = {name: [] for name in paths}
    for r in range(args.rounds):
        for name, loader in paths.items():
            results[name].append(samples_per_second(loader))
            print(f"round {r + 1}: {name}: {results[name][-1]:,.0f} samples/s", flush=True)
    medians = {name: statistics.median(v) for name, v in results.items()}
    for name, value in medians.items():
        print(f"{name:>24}: {value:>12,.0f} samples/s (median of {args.rounds})")
    best_loader = max(v for name, v in medians.items() if name != "in-memory")
    print(f"speedup={medians['in-memory'] / best_loader:.1f}")


if __name__ == "__main__":
    main()
