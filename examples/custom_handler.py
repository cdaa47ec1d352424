"""Your own handlers beside ours, attached through the run API (``fit(..., handlers=[...])``).

    python examples/custom_handler.py --data-dir ../shared/data --epochs 3 --limit-train-batches 100 --target 0.95

Our handlers run at each epoch end in a fixed order of stages, whatever order they are attached in:
METRICS -> VALIDATION -> RECORD -> DECISION -> CHECKPOINT -> LOGGING. A handler you give to ``fit``
is attached after ours with ``attach(trainer, evaluator)`` (or ``attach(trainer)``); one with
``state_dict``/``load_state_dict`` is saved in every checkpoint and restored on resume. A plain
``trainer.add_event_handler`` runs after the whole block, so it sees the epoch's train and validation
metrics; to run *inside* the block, e.g. a decision the checkpoint must record, use
``attach_ordered(trainer, event, fn, Stage.DECISION)``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ignite.engine import Engine, Events
from train_mnist import MNIST_MEAN, MNIST_STD, FastNet, MnistSettings, load_mnist

from handlers import Stage, attach_ordered, cli, fit, write_line


class StopAtAccuracy:
    """Stop training once validation accuracy reaches ``target``: a decision, so it runs at
    Stage.DECISION (after validation, before checkpoints and loggers), and its state is checkpointed."""

    def __init__(self, target: float) -> None:
        if not 0 < target <= 1:
            raise ValueError(f"target must be in (0, 1], got {target!r}")
        self.target = target
        self.reached_at: int | None = None

    def attach(self, trainer: Engine) -> StopAtAccuracy:
        attach_ordered(trainer, Events.EPOCH_COMPLETED, self, Stage.DECISION)
        return self

    def __call__(self, trainer: Engine) -> None:
        accuracy = trainer.state.metrics.get("val_accuracy")
        if accuracy is not None and accuracy >= self.target:
            self.reached_at = trainer.state.epoch
            write_line(f"Reached {accuracy * 100:.2f}% >= {self.target * 100:.2f}% at epoch {self.reached_at}: stop")
            trainer.terminate()

    def state_dict(self) -> dict:
        return {"reached_at": self.reached_at}

    def load_state_dict(self, state: dict) -> None:
        self.reached_at = state["reached_at"]


class Report:
    """A plain Ignite handler: after everything of ours, one line with what it sees."""

    def attach(self, trainer: Engine, evaluator: Engine) -> Report:
        self.evaluator = evaluator
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self)
        return self

    def __call__(self, trainer: Engine) -> None:
        m = trainer.state.metrics
        write_line(f"[my handler] epoch {trainer.state.epoch}: train_loss={m['train_loss']:.4f} "
                   f"val_accuracy={m['val_accuracy']:.4f} (evaluator ran {self.evaluator.state.iteration} batches)")


@dataclass
class Settings(MnistSettings):
    target: float = 0.999


def train(s: Settings) -> int:
    stopper = StopAtAccuracy(s.target)
    train_data, val_data = load_mnist(s)
    result = fit(FastNet(s.width or 16), train_data, val_data, s, handlers=[stopper, Report()], name="custom",
                 denormalize=lambda x: x * MNIST_STD + MNIST_MEAN)
    write_line(f"[my handler] stopped early: {stopper.reached_at is not None}")
    return result.exit_code


if __name__ == "__main__":
    parser = cli.run_parser(__doc__.splitlines()[0], Settings(), data_env="MNIST_ROOT")
    parser.add_argument("--target", type=float, default=0.999, help="stop at this validation accuracy")
    cli.exit_process(cli.main(train, parser, Settings))  # sys.exit without the ~1 s teardown
