"""The LR finder (Ignite's ``FastaiLRFinder``, as in fastai and Lightning): the loss over one short run
whose learning rate grows exponentially, and the rate it suggests; the model, the optimiser, the random
generators and the data order are left exactly as they were."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from ignite.engine import Engine
from ignite.handlers import FastaiLRFinder

from handlers.history import write_json_atomic
from handlers.rng import RNGState

__all__ = ["LRFinder"]


class LRFinder:
    """Run Ignite's ``FastaiLRFinder`` on ``trainer`` (a bare one: every handler on it runs too) over
    at most one epoch of ``loader``, from ``start_lr`` to ``end_lr`` (it stops early once the loss
    diverges), restoring ``to_save`` (model, optimizer, ...) and the random generators afterwards.

        finder = LRFinder().run(trainer, loader, {"model": model, "optimizer": optimizer})
        finder.suggestion, finder.results     # lr, {"lr": [...], "loss": [...]}
        finder.write(run_dir)                 # lr_finder.json, lr_finder.png, TensorBoard curve
    """

    def __init__(self, start_lr: float = 1e-7, end_lr: float = 10.0, num_iter: int | None = None,
                 log: Callable[[str], None] = print, cuda_device: torch.device | None = None) -> None:  # fmt: skip
        if not 0 < start_lr < end_lr:
            raise ValueError(f"need 0 < start_lr < end_lr, got {start_lr!r}, {end_lr!r}")
        if num_iter is not None and (not isinstance(num_iter, int) or num_iter < 2):
            raise ValueError(f"num_iter must be an integer >= 2, got {num_iter!r}")
        self.start_lr, self.end_lr, self.num_iter, self.log = start_lr, end_lr, num_iter, log
        self.cuda_device = cuda_device  # the run's GPU, whose generator (dropout's) is put back too
        self.results: dict[str, list[float]] = {}
        self.suggestion: float | None = None  # None: the curve had no fall to suggest from

    def run(self, trainer: Engine, loader: Iterable, to_save: Mapping[str, Any]) -> "LRFinder":
        try:
            length = len(loader)  # type: ignore[arg-type]
        except TypeError:  # a stream of unknown length
            length = None
        num_iter = self.num_iter or length or 100
        if length is not None:
            num_iter = min(num_iter, length)  # at most one epoch
        rng = RNGState(self.cuda_device)
        saved = rng.state_dict()
        finder = FastaiLRFinder()
        finder.logger.setLevel("ERROR")  # our own line says what it found
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Run completed without loss diverging")  # our line says it
                with finder.attach(trainer, to_save=dict(to_save), output_transform=lambda out: out["loss"],
                                   num_iter=num_iter, start_lr=self.start_lr, end_lr=self.end_lr) as finding:
                    finding.run(loader, max_epochs=1, epoch_length=length or num_iter)
        finally:
            rng.load_state_dict(saved)
        results = finder.get_results()
        self.results = {"lr": [float(v) for v in results["lr"]], "loss": [float(v) for v in results["loss"]]}
        try:
            suggestion = finder.lr_suggestion()
        except RuntimeError:  # Ignite: "unexpected curve shape" (no fall, or too few points)
            self.suggestion = None
            return self
        self.suggestion = float(suggestion[0] if isinstance(suggestion, list) else suggestion)
        return self

    @property
    def tried(self) -> tuple[float, float]:
        return (min(self.results["lr"]), max(self.results["lr"])) if self.results.get("lr") else (math.nan, math.nan)

    def line(self) -> str:
        low, high = self.tried
        tried = f"tried {low:.3g} to {high:.3g} over {len(self.results['lr'])} batches"
        if self.suggestion is None:
            return (f"LR finder: no suggestion ({tried}): the loss did not fall and rise again; try it on more "
                    f"batches, or with data that can be learnt (see lr_finder.png)")
        return f"LR finder: suggested lr {self.suggestion:.3g} ({tried}; the steepest fall of the smoothed loss)"

    def write(self, out: Path, tensorboard: bool = True) -> None:
        """``lr_finder.json`` (suggestion, range, (lr, loss) pairs), ``lr_finder.png`` and, with
        ``tensorboard``, the curve under ``tb/lr_finder`` (loss against step, and the lr)."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        low, high = self.tried
        write_json_atomic(out / "lr_finder.json", {"suggestion": self.suggestion, "range": [low, high],
                                                   "lr": self.results["lr"], "loss": self.results["loss"]})
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self.results["lr"], self.results["loss"])
        if self.suggestion is not None:
            ax.axvline(self.suggestion, color="tab:red", linestyle="--", label=f"suggested {self.suggestion:.3g}")
            ax.legend()
        ax.set(xscale="log", xlabel="learning rate", ylabel="loss (smoothed)", title="LR finder")
        fig.tight_layout()
        fig.savefig(out / "lr_finder.png", dpi=100)
        plt.close(fig)
        if tensorboard:
            from tensorboardX import SummaryWriter

            with SummaryWriter(str(out / "tb" / "lr_finder")) as writer:
                for step, (lr, loss) in enumerate(zip(self.results["lr"], self.results["loss"]), 1):
                    writer.add_scalar("lr_finder/loss", loss, step)
                    writer.add_scalar("lr_finder/lr", lr, step)
