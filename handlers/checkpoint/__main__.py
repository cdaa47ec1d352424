"""``python -m handlers.checkpoint verify PATH...``: is each checkpoint intact? Worth running before
copying a model away. One line per file, ``OK`` or ``DAMAGED``; exit code 0 only if all are intact."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

from engine.errors import CheckpointError
from handlers.checkpoint.loading import load_checkpoint


def describe(data: Mapping[str, Any]) -> str:
    """``format 3, epoch 3, iteration 1407, val_accuracy=0.9912`` for a loaded checkpoint."""
    meta, trainer = data["meta"], data["trainer"]
    iteration, length = int(trainer["iteration"]), int(trainer.get("epoch_length") or 0)
    where = f"epoch {iteration // length}" if length else "epoch ?"
    if length and iteration % length:
        where += f" and {iteration % length} iteration(s) of the next"
    metric, score = meta.get("metric"), meta.get("score")
    watched = f"{metric}={score:.4f}" if metric and score is not None else (
        f"{metric}: not measured then" if metric else "watched metric not recorded (format 1)")
    return f"format {meta['version']}, {where}, iteration {iteration}, {watched}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m handlers.checkpoint", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check every record of each file against its stored CRC-32")
    verify.add_argument("paths", nargs="+", metavar="PATH")
    args = parser.parse_args(argv)
    damaged = 0
    for path in args.paths:
        try:
            data = load_checkpoint(path)
        except CheckpointError as exc:
            damaged += 1
            print(f"DAMAGED {path}: {exc}")
            continue
        print(f"OK {path}: {describe(data)}")
    return 1 if damaged else 0


if __name__ == "__main__":
    sys.exit(main())
