"""Your own handlers beside ours: a decorated function and a small class with ``attach``.

    python examples/custom_handler.py --data-dir ../shared/data --epochs 2 --limit-train-batches 100

Our handlers run at each epoch end in a fixed order of stages, whatever order they are attached in:
METRICS -> VALIDATION -> RECORD -> DECISION -> CHECKPOINT -> LOGGING. A plain ``@trainer.on(...)``
handler runs after that whole block if it is attached after our handlers (as here), so it sees
the epoch's train and validation metrics. To put a handler *inside* the block, e.g. a decision
that must happen before the checkpoint, use ``attach_ordered(trainer, event, fn, Stage.DECISION)``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from ignite.engine import Engine, Events  # noqa: E402
from ignite.metrics import Accuracy, Loss  # noqa: E402
from torch import nn  # noqa: E402

from engine import ConfigError, InMemoryLoader, create_evaluator, create_trainer  # noqa: E402
from handlers import Stage, TrainMetrics, Validation, attach_ordered, write_line  # noqa: E402
from train_mnist import MNIST_MEAN, MNIST_STD, FastNet, load_mnist  # noqa: E402


class StopAtAccuracy:
    """A user's handler class: stop training once validation accuracy reaches ``target``.

    A decision, so it runs at Stage.DECISION: after validation, before checkpoints and loggers.
    """

    def __init__(self, target: float) -> None:
        if not 0 < target <= 1:
            raise ValueError(f"target must be in (0, 1], got {target!r}")
        self.target = target
        self.reached_at: int | None = None

    def attach(self, trainer: Engine) -> "StopAtAccuracy":
        attach_ordered(trainer, Events.EPOCH_COMPLETED, self, Stage.DECISION)
        return self

    def __call__(self, trainer: Engine) -> None:
        accuracy = trainer.state.metrics.get("val_accuracy")
        if accuracy is not None and accuracy >= self.target:
            self.reached_at = trainer.state.epoch
            write_line(f"Reached {accuracy * 100:.2f}% >= {self.target * 100:.2f}% at epoch {trainer.state.epoch}: stop")
            trainer.terminate()

    def state_dict(self) -> dict:
        return {"reached_at": self.reached_at}

    def load_state_dict(self, state: dict) -> None:
        self.reached_at = state["reached_at"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=os.environ.get("MNIST_ROOT") or "./data")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--limit-train-batches", type=int, default=None)
    p.add_argument("--target", type=float, default=0.999)
    args = p.parse_args()

    torch.manual_seed(0)
    train_set, val_set = (load_mnist(args.data_dir, train, download=True) for train in (True, False))
    norm = lambda ds: ds.data.float().div(255).sub(MNIST_MEAN).div(MNIST_STD).unsqueeze(1)  # noqa: E731
    train_loader = InMemoryLoader(norm(train_set), train_set.targets, 128, max_batches=args.limit_train_batches)
    val_loader = InMemoryLoader(norm(val_set), val_set.targets, 2000, shuffle=False)

    model = FastNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    trainer = create_trainer(model, optimizer, nn.CrossEntropyLoss(), device="cpu")
    evaluator = create_evaluator(model, {"loss": Loss(nn.CrossEntropyLoss()), "accuracy": Accuracy()}, device="cpu")

    # Our handlers.
    TrainMetrics().attach(trainer)
    Validation(evaluator, val_loader).attach(trainer)

    # Your handlers: a class with attach ...
    stopper = StopAtAccuracy(args.target).attach(trainer)

    # ... and a plain function, Ignite's way. It sees everything the block above published.
    @trainer.on(Events.EPOCH_COMPLETED)
    def report(engine: Engine) -> None:
        m = engine.state.metrics
        write_line(f"[my handler] epoch {engine.state.epoch}: train_loss={m['train_loss']:.4f} "
                   f"val_accuracy={m['val_accuracy']:.4f} lr={optimizer.param_groups[0]['lr']:g}")

    trainer.run(train_loader, max_epochs=args.epochs)
    write_line(f"[my handler] stopped early: {stopper.reached_at is not None}")


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
