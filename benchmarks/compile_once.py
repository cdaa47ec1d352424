"""``--compile`` paid once: the default command compiled a second time (its caches warm) against the same command
eager, as whole processes, what a user waits for.

In a fresh cache folder (``XDG_CACHE_HOME`` a temporary folder: nothing of an earlier run), the compiled command
runs once (the first compile, timed and reported), then ``--rounds`` rounds each run the eager and the compiled
process one after the other, the order alternated; each round's ratio is compiled / eager. Every process is
``examples/train_mnist.py`` with its defaults (one epoch), timed from before the start to the exit. What each
compiled process still paid over the eager one (``torch._dynamo.utils.compile_times``) is printed from its
last round: Dynamo's tracing, the cache's loads, and the compiler's imports.

    python benchmarks/compile_once.py [--rounds 3] [-- extra flags for both]

Last line: ``compile_second_ratio=<median compiled / eager> first_ratio=<first compiled / median eager>``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, mnist_root

# the example run with Dynamo's own account of its time printed at exit (the compiled runs only)
_RUN = """
import atexit, runpy, sys
def account():
    if "torch._dynamo" in sys.modules:
        from torch._dynamo.utils import compile_times
        print("COMPILE_TIMES " + compile_times(repr="str", aggregate=True).replace("\\n", "; "), file=sys.stderr)
atexit.register(account)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run(cache: str, out: Path, compiled: bool, extra: list[str]) -> tuple[float, float, str]:
    """Seconds of one whole process, its validation accuracy, Dynamo's account (compiled runs)."""
    flags = ["--compile"] if compiled else []
    cmd = [sys.executable, "-c", _RUN, str(ROOT / "examples" / "train_mnist.py"), "--data-dir", mnist_root(),
           "--output-dir", str(out), *flags, *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**_env(), "XDG_CACHE_HOME": cache})
    took = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    history = json.loads((out / "history.json").read_text())
    rows = history if isinstance(history, list) else history["epochs"]
    account = next((line for line in proc.stderr.splitlines() if line.startswith("COMPILE_TIMES")), "")
    return took, float(rows[-1]["val_accuracy"]), account


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # the example's own default, under XDG_CACHE_HOME
    return env


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("extra", nargs="*", help="flags for both commands (after --)")
    args = p.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        cache, outs = str(Path(tmp) / "cache"), Path(tmp)
        first, acc, _ = run(cache, outs / "first", True, args.extra)
        print(f"first compiled run: {first:.2f} s ({acc:.2%})")
        ratios, eager_times, account = [], [], ""
        for r in range(args.rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            took, accuracy = {}, {}
            for compiled in order:
                took[compiled], accuracy[compiled], text = run(cache, outs / f"r{r}{compiled}", compiled, args.extra)
                account = text or account
            eager_times.append(took[False])
            ratios.append(took[True] / took[False])
            print(f"round {r + 1}: eager {took[False]:.2f} s ({accuracy[False]:.2%}), compiled {took[True]:.2f} s "
                  f"({accuracy[True]:.2%}), ratio {ratios[-1]:.3f}")
    print(account.replace("; ", "\n  ") if account else "(no compile account)")
    print(f"compile_second_ratio={statistics.median(ratios):.3f} "
          f"first_ratio={first / statistics.median(eager_times):.3f}")


if __name__ == "__main__":
    main()
