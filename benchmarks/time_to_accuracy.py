"""Wall seconds to 99.0% validation accuracy: the seed preset vs the default preset, in one run.

Each preset runs as a real process (`examples/train_mnist.py`, every default handler on). The
clock starts before the process starts. For the seed preset the figure is the time at which it
prints its first validation line at or above the target (the process is then stopped); for the
default preset it is the whole process, start to exit, and it must have reached the target.

    python benchmarks/time_to_accuracy.py [--target 99.0] [--plot docs/time_to_accuracy.png]

Last line: ratio=<default/seed>
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, mnist_root

VAL = re.compile(r"^Epoch (\d+), Val Loss: [\d.]+, Val Accuracy: ([\d.]+)%")


def run(preset: str, target: float, out: str, stop_at_target: bool) -> dict:
    cmd = [sys.executable, str(ROOT / "examples" / "train_mnist.py"), "--preset", preset, "--data-dir", mnist_root(),
           "--output-dir", out, "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    points, reached = [(0.0, 0.0)], None
    for line in proc.stdout:
        m = VAL.match(line)
        if m:
            t, acc = time.perf_counter() - start, float(m.group(2))
            points.append((round(t, 2), acc))
            print(f"  {preset}: epoch {m.group(1)} val {acc:.2f}% at {t:.1f} s", flush=True)
            if acc >= target and reached is None:
                reached = t
                if stop_at_target:
                    proc.terminate()
                    break
    proc.wait()
    total = time.perf_counter() - start
    return {"preset": preset, "reached_s": reached, "process_s": total, "points": points, "returncode": proc.returncode}


def plot(results: list[dict], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        t, acc = zip(*r["points"][1:])
        ax.plot(t, acc, marker="o", label=f"--preset {r['preset']}")
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"{target}%")
    ax.set_xlabel("wall seconds since process start")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_ylim(96, 100)
    ax.set_title("MNIST: validation accuracy against wall time (2-core CPU)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", type=float, default=99.0)
    p.add_argument("--plot", type=Path, default=None, help="write the accuracy-vs-time plot (PNG) here")
    args = p.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        seed = run("seed", args.target, f"{tmp}/seed", stop_at_target=True)
        default = run("fast", args.target, f"{tmp}/fast", stop_at_target=False)
    if args.plot:
        plot([seed, default], args.target, args.plot)
        args.plot.with_suffix(".json").write_text(json.dumps([seed, default], indent=1))
    if seed["reached_s"] is None or default["reached_s"] is None or default["returncode"] != 0:
        sys.exit(f"a preset did not reach {args.target}%: seed {seed['reached_s']}, default {default['reached_s']}")
    print(f"seed preset: {args.target}% after {seed['reached_s']:.1f} s")
    print(f"default preset: {args.target}% after {default['reached_s']:.1f} s; whole process {default['process_s']:.1f} s")
    print(f"ratio={default['process_s'] / seed['reached_s']:.3f}")


if __name__ == "__main__":
    main()
