"""``--compile`` paid once: the default command compiled a second time (its caches warm) against the same command
eager, as whole processes, what a user waits for.

In a fresh cache folder (``XDG_CACHE_HOME`` a temporary folder: nothing of an earlier run), the compiled command
runs once (the first compile, timed and reported), then ``--rounds`` rounds each run the eager and the compiled
process one after the other, the order rotated; each round's ratio is compiled / eager. Every process is
``examples/train_mnist.py`` with its defaults (one epoch), timed from before the start to the exit. What each
compiled process still paid over the eager one (``torch._dynamo.utils.compile_times``) is printed from its
last round: Dynamo's tracing, the cache's loads, and the compiler's imports.

    python benchmarks/compile_once.py [--rounds 3] [--precompile] [-- extra flags for every command]

``--precompile`` adds a third side, compiled with PyTorch's experimental Dynamo cache
(``TORCH_CACHING_PRECOMPILE=1``, its own cache folder; the run's artifacts then carry Dynamo's entries, and a
second process skips the tracing), in the same rounds (the order rotated each round).

Last line: ``compile_second_ratio=<median compiled / eager> first_ratio=<first compiled / median eager>``
(and ``precompile_second_ratio``)
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


def run(cache: str, out: Path, compiled: bool, extra: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """Seconds of one whole process, its validation accuracy, Dynamo's account (compiled runs)."""
    flags = ["--compile"] if compiled else []
    cmd = [sys.executable, "-c", _RUN, str(ROOT / "examples" / "train_mnist.py"), "--data-dir", mnist_root(),
           "--output-dir", str(out), *flags, *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**_env(), **env, "XDG_CACHE_HOME": cache})
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
    env.pop("TORCH_CACHING_PRECOMPILE", None)  # on for the precompile side alone
    return env


# side -> (compiled, environment); each compiled side has its own cache folder
SIDES = {"eager": (False, {}), "compiled": (True, {}), "precompile": (True, {"TORCH_CACHING_PRECOMPILE": "1"})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--precompile", action="store_true",
                   help="a third side: compiled with PyTorch's experimental Dynamo cache (TORCH_CACHING_PRECOMPILE=1)")
    p.add_argument("extra", nargs="*", help="flags for every command (after --)")
    args = p.parse_args()
    print(machine())
    names = ["eager", "compiled"] + (["precompile"] if args.precompile else [])
    took: dict[str, list[float]] = {name: [] for name in names}
    account = ""
    with tempfile.TemporaryDirectory() as tmp:
        outs = Path(tmp)
        first = {}
        for name in names[1:]:  # the first compile of each compiled side, in its own fresh cache
            first[name], acc, _ = run(str(outs / f"cache-{name}"), outs / f"first-{name}", True, args.extra,
                                      SIDES[name][1])
            print(f"first {name} run: {first[name]:.2f} s ({acc:.2%})")
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            line = []
            for name in order:
                compiled, env = SIDES[name]
                seconds, acc, text = run(str(outs / f"cache-{name}"), outs / f"r{r}-{name}", compiled, args.extra, env)
                took[name].append(seconds)
                account = text if name == "compiled" and text else account
                line.append(f"{name} {seconds:.2f} s ({acc:.2%})")
            print(f"round {r + 1}: " + ", ".join(line))
    print(account.replace("; ", "\n  ") if account else "(no compile account)")
    ratios = {name: [t / e for t, e in zip(took[name], took["eager"])] for name in names[1:]}
    for name, rs in ratios.items():
        sums = sum(took[name]) / sum(took["eager"])
        print(f"{name} / eager by round: {', '.join(f'{v:.3f}' for v in rs)}; sums {sums:.3f}")
    eager = statistics.median(took["eager"])
    print(" ".join([f"compile_second_ratio={statistics.median(ratios['compiled']):.3f}",
                    f"first_ratio={first['compiled'] / eager:.3f}"]
                   + ([f"precompile_second_ratio={statistics.median(ratios['precompile']):.3f}"] if args.precompile
                      else [])))


if __name__ == "__main__":
    main()
