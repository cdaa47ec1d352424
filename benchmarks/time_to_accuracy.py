"""Wall seconds to 99.0% validation accuracy: the default preset against the seed preset and two
plain-PyTorch references, in one run, one after the other.

Each runs as a real process; the clock starts before it starts. The presets run
`examples/train_mnist.py` with every default handler on. For the seed preset the figure is the
time at which it prints its first validation line at or above the target (the process is then
stopped); for the default preset it is the whole process, start to exit, and it must have reached
the target. The references are whole processes too, with no engine: `speedrun.py` (the
hand-written speed-run: small conv net, Adam 1e-2 betas (0.7, 0.9), one-cycle, batch 256, one
epoch) and `seed_loop.py` (the seed's loop, 3 epochs).

    python benchmarks/time_to_accuracy.py [--target 99.0] [--plot docs/time_to_accuracy.png] [--no-seed]

Last line: ratio=<default/seed preset> speedrun_ratio=<default/speed-run> seed_loop_ratio=<default/seed loop>
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


def reference(script: str, *args: str) -> dict:
    """A plain-PyTorch reference as a whole process: its seconds and final validation accuracy."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--data-dir", mnist_root(), *args],
                          capture_output=True, text=True)
    seconds = time.perf_counter() - start
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0 or not last.startswith("val_accuracy="):
        sys.exit(f"{script} failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    accuracy = float(last.split("=")[1]) * 100
    print(f"  {script}: {accuracy:.2f}% in {seconds:.1f} s (whole process)", flush=True)
    return {"script": script, "val_accuracy": accuracy, "process_s": seconds}


def plot(results: list[dict], target: float, path: Path, references: list[dict] = ()) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        t, acc = zip(*r["points"][1:])
        ax.plot(t, acc, marker="o", label=f"--preset {r['preset']}")
    for ref, marker in zip(references, "s^"):
        ax.plot([ref["process_s"]], [ref["val_accuracy"]], marker=marker, linestyle="none", color="black",
                label=f"{ref['script']} (plain PyTorch, whole process)")
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"{target}%")
    ax.set_xlabel("wall seconds since process start")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_ylim(96, 100)
    ax.set_title(f"MNIST: validation accuracy against wall time ({machine()})", fontsize=8)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", type=float, default=99.0)
    p.add_argument("--plot", type=Path, default=None, help="write the accuracy-vs-time plot (PNG) here")
    p.add_argument("--no-seed", action="store_true", help="skip the two slow seed runs (preset and loop)")
    args = p.parse_args()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        default = run("fast", args.target, f"{tmp}/fast", stop_at_target=False)
        speedrun = reference("speedrun.py")
        seed = None if args.no_seed else run("seed", args.target, f"{tmp}/seed", stop_at_target=True)
        seed_loop = None if args.no_seed else reference("seed_loop.py", "--epochs", "3")
    presets = [r for r in (seed, default) if r is not None]
    if args.plot:
        plot(presets, args.target, args.plot, [r for r in (speedrun, seed_loop) if r is not None])
        args.plot.with_suffix(".json").write_text(json.dumps([*presets, speedrun, seed_loop], indent=1))
    if default["reached_s"] is None or default["returncode"] != 0 or (seed and seed["reached_s"] is None):
        sys.exit(f"a preset did not reach {args.target}%: default {default['reached_s']}, "
                 f"seed {seed and seed['reached_s']}")
    whole = default["process_s"]
    print(f"default preset: {args.target}% after {default['reached_s']:.1f} s; whole process {whole:.1f} s")
    print(f"speed-run: {speedrun['val_accuracy']:.2f}% in {speedrun['process_s']:.1f} s")
    if seed:
        print(f"seed preset: {args.target}% after {seed['reached_s']:.1f} s; seed loop, 3 epochs: "
              f"{seed_loop['val_accuracy']:.2f}% in {seed_loop['process_s']:.1f} s")
    ratios = f"speedrun_ratio={whole / speedrun['process_s']:.3f}"
    if seed:
        ratios = f"ratio={whole / seed['reached_s']:.3f} {ratios} seed_loop_ratio={whole / seed_loop['process_s']:.3f}"
    print(ratios)


if __name__ == "__main__":
    main()
