"""The seed preset against the seed's own plain loop, as whole processes: what a user waits for.

Each round runs, one after the other (alternating which goes first), two real processes over the
same number of batches, timed from before the start to the exit:

- ``examples/train_mnist.py --preset seed --epochs 1 --limit-train-batches N`` (every default
  handler on: validation, checkpoints with fsync, TensorBoard with images and hparams, history,
  NaN guard, stop signals, console lines);
- ``benchmarks/seed_loop.py --epochs 1 --limit-train-batches N`` (the seed's loop: DataLoader with
  ToTensor + Normalize, the seed's CNN, Adam 1e-3, batch 64, a full validation; no engine).

Both train N batches of 64 and validate on the whole test set. Unlike ``overhead.py`` (which
times the loops side by side inside one process), this includes everything around the loop:
imports, data loading, the checks before the first step, the last records, the exit.

    python benchmarks/seed_process.py [--rounds 3] [--limit-train-batches 300]

Each process's time outside its epoch (the whole process less the epoch's ``epoch_seconds``,
training and validation, from history.json or the loop's line) is its fixed cost: imports, data
loading, the checks before the first step, the last records, the exit. It is printed beside the
ratio: the epochs themselves vary by several percent from one process to the next here, which the
median of three rounds does not average away, while the fixed costs vary much less.

Last line: seed_process_ratio=<median of ours/loop over the rounds> sum_ratio=<sum of ours / sum of the loop's>
fixed_difference=<median of ours' fixed cost - the loop's, seconds>
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, mnist_root


def timed(cmd: list[str]) -> tuple[float, str]:
    """Wall seconds of a whole process and its standard output; exits on failure."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd[1:3])} failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    return seconds, proc.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--limit-train-batches", type=int, default=300)
    args = p.parse_args()
    n, data = str(args.limit_train_batches), mnist_root()
    print(f"machine: {machine()}; {n} training batches of 64 and the whole test set, {args.rounds} rounds")
    ours_s, loop_s, fixed = [], [], {"ours": [], "loop": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            preset = [sys.executable, str(ROOT / "examples" / "train_mnist.py"), "--preset", "seed", "--epochs", "1",
                      "--limit-train-batches", n, "--no-progress", "--data-dir", data, "--output-dir", f"{tmp}/r{r}"]
            loop = [sys.executable, str(ROOT / "benchmarks" / "seed_loop.py"), "--epochs", "1",
                    "--limit-train-batches", n, "--data-dir", data]
            order = [("ours", preset), ("loop", loop)]
            for name, cmd in order if r % 2 == 0 else order[::-1]:
                seconds, out = timed(cmd)
                (ours_s if name == "ours" else loop_s).append(seconds)
                acc = next((line.split("Val Accuracy: ")[1].split("%")[0] for line in out.splitlines()
                            if "Val Accuracy: " in line), "?")
                if name == "ours":
                    epoch = json.loads((Path(tmp) / f"r{r}" / "history.json").read_text())[0]["epoch_seconds"]
                else:
                    epoch = float(re.search(r"epoch_seconds=([0-9.]+)", out).group(1))
                fixed[name].append(seconds - epoch)
                print(f"round {r + 1}: {name:4s} {seconds:6.2f} s, of which the epoch {epoch:6.2f} s and the rest "
                      f"{seconds - epoch:5.2f} s  (val accuracy {acc}%)", flush=True)
            diff = ours_s[-1] - loop_s[-1]
            print(f"round {r + 1}: ours/loop {ours_s[-1] / loop_s[-1]:.4f}  (ours - loop {diff:+.2f} s; outside the "
                  f"epoch {fixed['ours'][-1] - fixed['loop'][-1]:+.2f} s)", flush=True)
    ratios = [a / b for a, b in zip(ours_s, loop_s)]
    print(f"median of {args.rounds} rounds; spread {min(ratios):.4f}..{max(ratios):.4f}; "
          f"median difference {statistics.median(a - b for a, b in zip(ours_s, loop_s)):+.2f} s")
    fixed_diff = statistics.median(a - b for a, b in zip(fixed["ours"], fixed["loop"]))
    print(f"outside the epoch: ours {', '.join(f'{x:.2f}' for x in fixed['ours'])} s, the loop "
          f"{', '.join(f'{x:.2f}' for x in fixed['loop'])} s")
    print(f"seed_process_ratio={statistics.median(ratios):.4f} sum_ratio={sum(ours_s) / sum(loop_s):.4f} "
          f"fixed_difference={fixed_diff:+.2f}")


if __name__ == "__main__":
    main()
