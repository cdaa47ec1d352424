"""A run's cost against its number of classes: the same small MLP and data, 10 to 10,000 classes.

Each count of classes is one whole process (``fit`` with every default handler, TensorBoard on: the
confusion counts, the picture or the table of mistakes after the last validation), run as a user runs
it: 8,192 training samples of 32 features, 2,048 validation samples, 2 epochs. Per count: the process's
seconds, its peak memory (``VmHWM``), the seconds after the last validation (the epoch-end artefacts,
the summary), and the size of the output folder.

    python benchmarks/classes.py [--classes 10 100 1000 10000]

Last line: ratio_1000_vs_10=<process seconds at 1000 classes / at 10>
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine

PROGRAM = r"""
import sys, time
sys.path.insert(0, {root!r})
import torch
from torch import nn
from ignite.engine import Events
from engine import RunSettings
from handlers import fit

classes, out = int(sys.argv[1]), sys.argv[2]
g = torch.Generator().manual_seed(0)
centres = torch.randn(classes, 32, generator=g)
def data(n):
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + 0.5 * torch.randn(n, 32, generator=g), y
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, classes))
marks = {{}}
class LastValidation:
    def attach(self, trainer, evaluator):
        evaluator.add_event_handler(Events.COMPLETED, lambda e: marks.update(validated=time.perf_counter()))
        return self
result = fit(model, data(8192), data(2048), RunSettings(output_dir=out, epochs=2, batch_size=64, progress=False,
             log_every=0, device="cpu"), handlers=[LastValidation()])
end = time.perf_counter()
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024**2
print("RESULT", end - marks["validated"], peak, result.history[-1]["val_accuracy"])
"""


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 1024**2


def measure(classes: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", PROGRAM.format(root=str(ROOT)), str(classes), str(out)],
                              capture_output=True, text=True, timeout=1800)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"{classes} classes: exit {proc.returncode}\n{proc.stderr[-2000:]}")
        after, peak, accuracy = map(float, proc.stdout.split("RESULT", 1)[1].split())
        return {"classes": classes, "process_s": round(seconds, 2), "after_last_validation_s": round(after, 3),
                "peak_gb": round(peak, 3), "output_mb": round(folder_mb(out), 2), "val_accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 100, 1000, 10000])
    args = parser.parse_args()
    print(machine())
    rows = []
    for classes in args.classes:
        rows.append(measure(classes))
        print(json.dumps(rows[-1]), flush=True)
    by = {r["classes"]: r for r in rows}
    if 10 in by and 1000 in by:
        print(f"ratio_1000_vs_10={by[1000]['process_s'] / by[10]['process_s']:.3f}")


if __name__ == "__main__":
    main()
