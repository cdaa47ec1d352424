"""What each engine option gives on this machine: training samples/s of the default preset.

One epoch per setting (every default handler on), settings run in rotation for ``--rounds``
rounds; the figure is the median training-phase throughput (``samples_per_second`` of
history.json) and its ratio to the default setting measured in the same rounds.

    python benchmarks/options.py [--rounds 2]

Last line: best=<option> speedup=<x>
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, machine, mnist_root

SETTINGS = {
    "default (channels-last, --amp auto)": [],
    "--amp fp32": ["--amp", "fp32"],
    "--amp bf16": ["--amp", "bf16"],
    "--no-channels-last": ["--no-channels-last"],
    "--threads 1": ["--threads", "1"],
    "--compile": ["--compile"],
}


def throughput(extra: list[str], out: str) -> float:
    flags = ["--epochs", "1", "--no-progress", "--no-tensorboard", "--data-dir", mnist_root(), "--output-dir", out]
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "train_mnist.py"), *flags, *extra],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"exit code {proc.returncode}: {proc.stderr.strip()[-200:]}")
    return json.loads((Path(out) / "history.json").read_text())[-1]["samples_per_second"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    print(f"machine: {machine()}")
    results: dict[str, list[float]] = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for i, (name, extra) in enumerate(SETTINGS.items()):
                try:
                    results[name].append(throughput(extra, f"{tmp}/{r}-{i}"))
                    print(f"round {r + 1}: {name}: {results[name][-1]:,.0f} samples/s", flush=True)
                except Exception as exc:  # an option that does not work here is reported, not fatal
                    print(f"round {r + 1}: {name}: failed ({type(exc).__name__}: {str(exc)[:120]})", flush=True)
    base = statistics.median(results["default (channels-last, --amp auto)"])
    best_name, best = "default (channels-last, --amp auto)", 1.0
    for name, values in results.items():
        if values:
            ratio = statistics.median(values) / base
            print(f"{name:>28}: {statistics.median(values):>8,.0f} samples/s  x{ratio:.2f}")
            if ratio > best:
                best_name, best = name, ratio
        else:
            print(f"{name:>28}: did not run")
    print(f"best={best_name.split(' (')[0]} speedup={best:.2f}")


if __name__ == "__main__":
    main()
