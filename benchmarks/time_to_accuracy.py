"""Wall seconds to 99.0% validation accuracy: the default preset against the plain-PyTorch speed-run,
in alternating rounds (and, with ``--with-seed``, the seed preset and the seed's loop once).

Each runs as a real process; the clock starts before it starts. The presets run
`examples/train_mnist.py` with every default handler on. For the default preset the figure is the
whole process, start to exit, and it must have reached the target; for the seed preset it is the
time at which it prints its first validation line at or above the target (the process is then
stopped). The references are whole processes too, with no engine: `speedrun.py` (the
hand-written speed-run: small conv net, Adam 1e-2 betas (0.7, 0.9), one-cycle, batch 256, one
epoch) and `seed_loop.py` (the seed's loop, 3 epochs).

This machine's speed drifts by tens of percent between runs, so the default and the speed-run
run in ``--rounds`` rounds, alternating which goes first; the figure is the median of the rounds'
ratios.

    python benchmarks/time_to_accuracy.py [--rounds 3] [--target 99.0] [--plot docs/time_to_accuracy.png] [--with-seed]

Last line: speedrun_ratio=<median default/speed-run> [ratio=<default/seed preset> seed_loop_ratio=<default/seed loop>]
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
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the default and the speed-run")
    p.add_argument("--plot", type=Path, default=None, help="write the accuracy-vs-time plot (PNG) here")
    p.add_argument("--with-seed", action="store_true", help="also the two slow seed runs (preset and loop), once")
    args = p.parse_args()
    print(f"machine: {machine()}")
    defaults, speedruns = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for which in ("default", "speed-run") if r % 2 == 0 else ("speed-run", "default"):
                if which == "default":
                    defaults.append(run("fast", args.target, f"{tmp}/fast{r}", stop_at_target=False))
                else:
                    speedruns.append(reference("speedrun.py"))
            d, s = defaults[-1], speedruns[-1]
            print(f"round {r + 1}: default {d['process_s']:.1f} s ({d['points'][-1][1]:.2f}%), speed-run "
                  f"{s['process_s']:.1f} s ({s['val_accuracy']:.2f}%): ratio {d['process_s'] / s['process_s']:.3f}",
                  flush=True)
        seed = run("seed", args.target, f"{tmp}/seed", stop_at_target=True) if args.with_seed else None
        seed_loop = reference("seed_loop.py", "--epochs", "3") if args.with_seed else None
    default, speedrun = defaults[-1], speedruns[-1]
    presets = [r for r in (seed, default) if r is not None]
    if args.plot:
        plot(presets, args.target, args.plot, [r for r in (speedrun, seed_loop) if r is not None])
        args.plot.with_suffix(".json").write_text(json.dumps([*presets, speedrun, seed_loop], indent=1))
    missed = [d["points"][-1][1] for d in defaults if d["reached_s"] is None or d["returncode"] != 0]
    if missed or (seed and seed["reached_s"] is None):
        sys.exit(f"a preset did not reach {args.target}%: default runs ending at {missed}, "
                 f"seed {seed and seed['reached_s']}")
    ratios = [d["process_s"] / s["process_s"] for d, s in zip(defaults, speedruns)]
    print("default preset: " + ", ".join(f"{d['points'][-1][1]:.2f}% in {d['process_s']:.1f} s" for d in defaults))
    print("speed-run: " + ", ".join(f"{s['val_accuracy']:.2f}% in {s['process_s']:.1f} s" for s in speedruns))
    print(f"median of {args.rounds} rounds; spread {min(ratios):.3f}..{max(ratios):.3f}")
    line = f"speedrun_ratio={statistics.median(ratios):.3f}"
    if seed:
        print(f"seed preset: {args.target}% after {seed['reached_s']:.1f} s; seed loop, 3 epochs: "
              f"{seed_loop['val_accuracy']:.2f}% in {seed_loop['process_s']:.1f} s")
        whole = statistics.median(d["process_s"] for d in defaults)
        line += f" ratio={whole / seed['reached_s']:.3f} seed_loop_ratio={whole / seed_loop['process_s']:.3f}"
    print(line)


if __name__ == "__main__":
    main()
