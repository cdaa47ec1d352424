"""A user's own program, as the README's: their data (augmenting CIFAR-shaped images, streams with and
without a position, dict batches, a lazy set far larger than memory), their model, `fit` and `cli.main`.
The tests run it as a real subprocess; `--kill-at N` sends this process a real SIGKILL after iteration
N's checkpoint, `--record PATH` writes one line per training batch (iteration, checksum of its inputs)."""

from __future__ import annotations

import dataclasses
import os
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from ignite.engine import Engine, Events
from torch import nn
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from torchvision.transforms import v2

from engine import RunSettings
from engine.transforms import Compose, RandomCrop, RandomHorizontalFlip
from examples.train_text import Reviews, TextClassifier, pad
from handlers import cli, fit

KINDS = ("augment", "fast", "stream", "stream-stateless", "dict", "text", "lazy")


def images(n: int, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    y = (x[:, 0].mean((1, 2)) > x[:, 2].mean((1, 2))).long() + 2 * (x[:, 1, :8].mean((1, 2)) > 0.5).long()
    return x, y


class AugmentingImages(Dataset):
    """CIFAR-shaped samples with a random crop and flip (torch's RNG), colour jitter (Python's) and
    noise (NumPy's) in ``__getitem__``, as a user writes it."""

    def __init__(self, n: int, seed: int, dicts: bool = False) -> None:
        self.x, self.y = images(n, seed)
        self.dicts = dicts
        self.tf = v2.Compose([v2.RandomCrop(16, padding=2), v2.RandomHorizontalFlip()])

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        x = self.tf(self.x[i]) * random.uniform(0.9, 1.1)
        x = x + torch.from_numpy(np.random.normal(0, 0.01, x.shape).astype(np.float32))
        return {"image": x, "label": self.y[i]} if self.dicts else (x, self.y[i])


class PositionStream(IterableDataset):
    """A stream of generated samples; with ``stateful`` it keeps its position (``state_dict``). Each
    DataLoader worker takes every ``num_workers``-th sample (its position counts in its own share)."""

    def __init__(self, n: int, seed: int, stateful: bool) -> None:
        self.x, self.y = images(n, seed)
        self.pos = 0
        if stateful:
            self.state_dict = lambda: {"pos": self.pos}
            self.load_state_dict = lambda state: setattr(self, "pos", state["pos"])

    def __iter__(self):
        info = get_worker_info()
        share = range(info.id, len(self.x), info.num_workers) if info is not None else range(len(self.x))
        start, self.pos = (self.pos, self.pos) if hasattr(self, "state_dict") else (0, 0)
        for k in range(start, len(share)):
            self.pos = k + 1
            yield self.x[share[k]], self.y[share[k]]
        self.pos = 0


class LazyImages(Dataset):
    """``n`` samples of 3x64x64 made on demand: ~49 KB each, 98 GB for two million."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return torch.rand(3, 64, 64, generator=g), i % 4


class Net(nn.Module):
    def __init__(self, dict_output: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                                 nn.Flatten(), nn.Dropout(0.2), nn.Linear(128, 4))  # fmt: skip
        self.dict_output = dict_output

    def forward(self, x: torch.Tensor):
        out = self.net(x)
        return {"logits": out, "features": x.mean()} if self.dict_output else out


class KillAt:
    """SIGKILL this process after iteration ``at`` (after our checkpoint handler of that iteration)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def attach(self, trainer: Engine) -> KillAt:
        kill = lambda _: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=self.at), kill)
        return self


class KillValidating:
    """SIGKILL this process in the middle of the validation at trainer iteration ``at`` (after its first batch)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def attach(self, trainer: Engine, evaluator: Engine) -> KillValidating:
        def kill(_: Engine) -> None:
            if trainer.state.iteration == self.at:
                os.kill(os.getpid(), signal.SIGKILL)

        evaluator.add_event_handler(Events.ITERATION_COMPLETED(once=1), kill)
        return self


class SignalAt:
    """A user's Ctrl-C at a known place: SIGINT to this process after iteration ``at``; then ``again`` more
    from where a test wants the next ones: from inside the stop's checkpoint save (``save``; ``thrice``:
    two there), while the summary is printed (``summary``)."""

    armed = False

    def __init__(self, at: int, again: str | None) -> None:
        self.at, self.again = at, again

    def attach(self, trainer: Engine) -> SignalAt:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=self.at), self._first)
        return self

    def _first(self, engine: Engine) -> None:
        SignalAt.armed = True
        os.kill(os.getpid(), signal.SIGINT)

    def state_dict(self) -> dict:  # saved in every checkpoint: the stop's save calls it
        if SignalAt.armed and self.again in ("save", "thrice"):
            SignalAt.armed = False
            for _ in range(2 if self.again == "thrice" else 1):
                os.kill(os.getpid(), signal.SIGINT)
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SignalAtLine:
    """Standard output that sends this process SIGINT as a line starting with ``prefix`` is written."""

    def __init__(self, stream, prefix: str) -> None:
        self.stream, self.prefix = stream, prefix

    def write(self, text: str) -> int:
        if text.startswith(self.prefix):
            os.kill(os.getpid(), signal.SIGINT)
        return self.stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


class Record:
    """One line per training batch: iteration and a checksum of the inputs the model saw."""

    def __init__(self, path: str) -> None:
        self.path = path

    def attach(self, trainer: Engine) -> Record:
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self)
        return self

    def __call__(self, engine: Engine) -> None:
        batch = engine.state.batch
        x = (batch.get("image", batch.get("input_ids")) if isinstance(batch, dict) else batch[0]).float()
        with open(self.path, "a") as f:
            f.write(f"{engine.state.iteration} {float(x.double().sum()):.10e} {float((x.double() ** 2).sum()):.10e}\n")


class FirstBatch:
    """Prints the seconds from ``fit`` to the first batch and the process's peak RSS then."""

    def __init__(self, started: float) -> None:
        self.started = started

    def attach(self, trainer: Engine) -> FirstBatch:
        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1), self)
        return self

    def __call__(self, engine: Engine) -> None:
        rss = peak_rss_gb()
        print(f"first batch after {time.perf_counter() - self.started:.2f} s, peak RSS {rss:.2f} GB", flush=True)


def peak_rss_gb() -> float:
    """This program's own peak RSS: ``VmHWM`` (of this program's memory map, new at exec). Not
    ``ru_maxrss``: Linux carries it over fork and exec, so a child of a 2 GB pytest worker reads 2 GB."""
    try:
        with open("/proc/self/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return kb / 1024**2
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


@dataclass
class Settings(RunSettings):
    kind: str = "augment"
    kill_at: int | None = None
    kill_validating: int | None = None
    record: str | None = None
    model_transform: bool = True
    model_fn: bool = True
    all_handlers: bool = False  # TensorBoard, console lines every 2 batches, early stopping: every default on
    signal_at: int | None = None  # SIGINT after this iteration (SignalAt)
    again_at: str | None = None  # save, thrice, summary (the next ones, SignalAt), after (once fit has returned)
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-2
    log_every: int = 0
    progress: bool = False
    tensorboard: bool = False
    patience: int = 0


def train(s: Settings):
    if s.all_handlers:
        s = dataclasses.replace(s, tensorboard=True, log_every=2, patience=3)
    started = time.perf_counter()
    extra = [KillAt(s.kill_at)] if s.kill_at else []
    extra += [KillValidating(s.kill_validating)] if s.kill_validating else []
    extra += [SignalAt(s.signal_at, s.again_at)] if s.signal_at else []
    if s.again_at == "summary":
        sys.stdout = SignalAtLine(sys.stdout, "Checkpoints: ")
    extra += [Record(s.record)] if s.record else []
    options = {}
    if s.kind in ("augment", "dict"):
        train_set, val_set = AugmentingImages(256, 1, s.kind == "dict"), AugmentingImages(96, 2, s.kind == "dict")
    elif s.kind == "fast":
        train_set, val_set = images(256, 1), images(96, 2)
        options["train_transform"] = Compose(RandomCrop(2), RandomHorizontalFlip())
    elif s.kind == "text":  # examples/train_text.py's: padded dict batches, forward(input_ids, attention_mask)
        train_set, val_set = Reviews(256, 1), Reviews(96, 2)
        options["collate_fn"] = pad
        if s.model_fn:
            options["model_fn"] = lambda model, x: model(**x)
    elif s.kind.startswith("stream"):
        stateful = s.kind == "stream"
        train_set, val_set = PositionStream(200, 1, stateful), PositionStream(96, 2, stateful)
    else:
        train_set, val_set = LazyImages(2_000_000), LazyImages(64)
        extra.append(FirstBatch(started))
    if s.kind == "dict" and s.model_transform:
        options["model_transform"] = lambda out: out["logits"]
    model = TextClassifier() if s.kind == "text" else Net(s.kind == "dict")
    result = fit(model, train_set, val_set, s, name=s.kind, handlers=extra, **options)
    if s.again_at == "after":
        os.kill(os.getpid(), signal.SIGINT)  # after the run, before the process's end
    return result


def main(argv: list[str] | None = None) -> int:
    """The program's command line (tests run it as a real process, and in-process where the process is
    not the point: never with --kill-at, which kills the process it runs in)."""
    parser = cli.run_parser("A user's program.", Settings())
    parser.add_argument("--kind", choices=KINDS, default="augment")
    parser.add_argument("--kill-at", type=cli.positive_int)
    parser.add_argument("--kill-validating", type=cli.positive_int)
    parser.add_argument("--record")
    parser.add_argument("--no-model-transform", dest="model_transform", action="store_false", default=None)
    parser.add_argument("--no-model-fn", dest="model_fn", action="store_false", default=None)
    parser.add_argument("--all-handlers", action="store_true", default=None)
    parser.add_argument("--signal-at", type=cli.positive_int)
    parser.add_argument("--again-at", choices=["save", "thrice", "summary", "after"])
    return cli.main(train, parser, Settings, argv=argv)


if __name__ == "__main__":
    sys.exit(main())
