"""What the checkpoint integrity record costs: the CRC-32s torch's zip writer stores (at save) and
our check of all of them (at load), for the seed preset's model with its Adam state.

torch computed those CRC-32s on every save before we checked them, so checking them adds nothing
to a save; this measures what they cost anyway (their share of the save), and what the check adds
to a load.

Save: the CRC-32s' share of a real ``TrainingCheckpoint`` save (temp file, fsync, rename), from
``torch.save`` + fsync of the same state with them on and off
(``torch.serialization.set_crc32_options``). Load: ``verify_checkpoint`` against ``torch.load`` of the
same file. All alternating within each round; medians of ``--rounds``.

    python benchmarks/checkpoint_integrity.py [--rounds 21]

Last line: crc_share_of_save=<percent> verify_cost=<percent of the load time>
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.serialization
from common import machine
from ignite.engine import Engine
from torch import nn

from handlers import TrainingCheckpoint, verify_checkpoint


def seed_model() -> nn.Module:
    """The seed preset's network (SeedNet of examples/train_mnist.py): 1.2 M parameters."""
    return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(), nn.Linear(128, 10))  # fmt: skip


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def raw_save(state: dict, path: Path, crc: bool) -> None:
    torch.serialization.set_crc32_options(crc)
    try:
        with open(path, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    finally:
        torch.serialization.set_crc32_options(True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=21)
    args = p.parse_args()
    print(f"machine: {machine()}")
    model = seed_model()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    optimizer.step()  # Adam's state exists, as in a real checkpoint
    trainer = Engine(lambda e, b: None)
    trainer.state.iteration, trainer.state.epoch_length, trainer.state.max_epochs = 0, 100, 5
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    times: dict[str, list[float]] = {k: [] for k in ("checkpoint save", "crc on", "crc off", "torch.load", "verify")}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = TrainingCheckpoint(tmp, {"model": model, "optimizer": optimizer, "trainer": trainer}, n_last=1)
        raw = Path(tmp) / "raw.pt"
        for r in range(args.rounds + 1):  # round 0 warms up
            trainer.state.iteration += 1
            sample = {"checkpoint save": timed(lambda: ckpt.save(trainer, best=False)),
                      "crc on": timed(lambda: raw_save(state, raw, True)),
                      "crc off": timed(lambda: raw_save(state, raw, False))}
            path = Path(ckpt.last_path)
            sample["torch.load"] = timed(lambda path=path: torch.load(path, map_location="cpu", weights_only=True))
            sample["verify"] = timed(lambda path=path: verify_checkpoint(path))
            if r:
                for k, v in sample.items():
                    times[k].append(v)
        size = path.stat().st_size
    med = {k: statistics.median(v) * 1000 for k, v in times.items()}
    for name, value in med.items():
        print(f"{name:>16}: {value:7.2f} ms (median of {args.rounds})")
    print(f"file size: {size / 1e6:.1f} MB")
    save_cost = (med["crc on"] - med["crc off"]) / med["checkpoint save"] * 100
    print(f"crc_share_of_save={save_cost:.1f}% verify_cost={med['verify'] / med['torch.load'] * 100:.1f}%")


if __name__ == "__main__":
    main()
