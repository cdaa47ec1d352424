"""The LR finder (Ignite's ``FastaiLRFinder``, as in fastai and Lightning): the loss over one short run
whose learning rate grows exponentially, and the rate it suggests; the model, the optimiser, the random
generators and the data order are left exactly as they were."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch
from ignite.engine import Engine
from ignite.handlers import FastaiLRFinder

from engine.determinism import deterministic_algorithms
from engine.errors import ConfigError, param
from engine.files import write_json_atomic
from engine.settings import RunSettings
from engine.trainer import create_trainer
from handlers.checkpoint.resume import data_order
from handlers.console import write_line
from handlers.feature import RunFeature, RunParts, RunResultMaker
from handlers.rng import RNGState
from handlers.run import Run, RunResult
from handlers.run_folder import check_output_dir, make_output_dir

__all__ = ["FindingLR", "LRFinder", "LRFinderRun"]


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

    def run(self, trainer: Engine, loader: Iterable, to_save: Mapping[str, Any]) -> LRFinder:
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


class LRFinderRun(RunResultMaker):
    """What :func:`~handlers.fit.build_run` returns for ``settings.find_lr``: its ``run()`` writes the
    finder's results into the run folder and returns exit code 0, without training."""

    def __init__(self, finder: LRFinder, settings: RunSettings, name: str) -> None:
        self.finder, self.settings, self.name = finder, settings, name

    def run(self) -> RunResult:
        out = check_output_dir(self.settings.output_dir, self.settings.resume, self.name)
        if idist.get_rank() == 0:
            make_output_dir(out)
            self.finder.write(out, tensorboard=self.settings.tensorboard)
            then = f"train at it with {param('lr', 'find')} or " if self.finder.suggestion is not None else "then "
            write_line(f"LR finder results: {out / 'lr_finder.json'}, {out / 'lr_finder.png'}; {then}"
                       f"give {param('lr')} a value")
        return RunResult(0, out)


class FindingLR(RunFeature):
    """``--find-lr`` (find, write, train nothing) and ``--lr find`` (find, then train at the suggestion):
    the finder on a bare trainer of the run's own step, over the run's training loader, whose data order
    (and a stream's place) is put back afterwards."""

    def __init__(self) -> None:
        self.finder: LRFinder | None = None

    @classmethod
    def of(cls, parts: RunParts) -> FindingLR | None:
        """The feature when the settings ask for the finder, else ``None``."""
        return cls() if parts.settings.find_lr or parts.settings.lr == "find" else None

    def before_training(self, parts: RunParts) -> LRFinderRun | None:
        self.finder = _find(parts)
        if parts.settings.find_lr:
            return LRFinderRun(self.finder, parts.settings, parts.name)
        if self.finder.suggestion is None:
            raise ConfigError(f"the LR finder found no learning rate to suggest (the loss did not fall and rise "
                              f"again over {len(self.finder.results['lr'])} batches): give {param('lr')} a value")
        for group in parts.optimizer.param_groups:
            group["lr"] = self.finder.suggestion
        parts.settings = dataclasses.replace(parts.settings, lr=self.finder.suggestion)
        parts.config["lr_finder"] = {"suggestion": self.finder.suggestion, "range": list(self.finder.tried)}
        return None

    def after_attach(self, run: Run, parts: RunParts) -> None:
        if idist.get_rank() == 0:
            self.finder.write(run.output_dir, tensorboard=parts.settings.tensorboard)


def _find(parts: RunParts) -> LRFinder:
    """The finder's run; says what it found."""
    s, device = parts.settings, parts.device.device
    order = data_order(parts.train_loader, None)
    saved = order.state_dict() if order is not None else None
    trainer = create_trainer(parts.run_model, parts.optimizer, parts.loss_fn, device=device, amp=parts.amp,
                             accumulation_steps=s.accumulation_steps, clip_grad_norm=s.clip_grad_norm,
                             channels_last=s.channels_last, seed=s.seed,
                             **parts.calls.engine_kwargs(parts.train_prepare), **parts.engine_options)
    to_save = {"model": parts.run_model, "optimizer": parts.optimizer}
    if trainer.scaler is not None:
        to_save["scaler"] = trainer.scaler
    try:
        with deterministic_algorithms(s.deterministic):
            finder = LRFinder(log=write_line, cuda_device=device if device.type == "cuda" else None).run(
                trainer, parts.train_loader, to_save)
    finally:
        if order is not None:
            order.load_state_dict(saved)
    write_line(finder.line())
    return finder
