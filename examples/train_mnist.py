"""Train a CNN on MNIST with the engine and its handlers.

    python examples/train_mnist.py                       # the fast default recipe
    python examples/train_mnist.py --preset seed         # the seed's loop, reproduced
    python examples/train_mnist.py --resume auto --output-dir runs/my-run

Read top to bottom: arguments -> data -> model -> engines -> handlers -> run.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402
from torch import nn  # noqa: E402

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
EXIT_USAGE, EXIT_NAN, EXIT_SAVE = 2, 3, 1


# ----------------------------------------------------------------------------- models
class SeedNet(nn.Module):
    """The seed's CNN: conv32 -> conv64 -> maxpool -> dropout -> fc128 -> dropout -> fc10."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class FastNet(nn.Module):
    """A small CNN that is fast on a CPU: strided conv-BN-ReLU blocks (no full-resolution pooling)
    down to 7x7, a global max pool and a linear head."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(1, w, 5, stride=2, padding=2, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False), nn.BatchNorm2d(4 * w), nn.ReLU(),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4 * w, 10),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


MODELS = {"seed": SeedNet, "fast": FastNet}

# ----------------------------------------------------------------------------- settings
PRESETS = {
    "seed": dict(model="seed", optimizer="adam", epochs=5, batch_size=64, val_batch_size=1000, lr=1e-3,
                 weight_decay=0.0, scheduler="none", warmup_epochs=0.0, data_path="torchvision", label_smoothing=0.0,
                 width=None, channels_last=False),
    "fast": dict(model="fast", optimizer="adam", epochs=3, batch_size=256, val_batch_size=2000, lr=8e-3,
                 weight_decay=0.0, scheduler="onecycle", warmup_epochs=0.0, data_path="memory", label_smoothing=0.0,
                 width=16, channels_last=True),
}  # fmt: skip


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag costs one line on stderr (and exit code 2), not the whole usage."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="Train a CNN on MNIST.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="fast", help="starting settings; flags override")
    p.add_argument("--data-dir", default=os.environ.get("MNIST_ROOT") or "./data",
                   help="folder holding MNIST/raw (default: $MNIST_ROOT, else ./data)")
    p.add_argument("--no-download", action="store_true", help="never try to download MNIST")
    p.add_argument("--output-dir", default=None, help="run folder (default: runs/mnist-<timestamp>)")
    p.add_argument("--resume", default=None, help="'auto' (newest valid last_*.pt in --output-dir) or a path")
    g = p.add_argument_group("recipe (default: from --preset)")
    g.add_argument("--model", choices=sorted(MODELS))
    g.add_argument("--width", type=positive_int, help="channels of the fast model's first block")
    g.add_argument("--optimizer", choices=["adam", "adamw", "sgd"])
    g.add_argument("--epochs", type=positive_int)
    g.add_argument("--batch-size", type=positive_int)
    g.add_argument("--val-batch-size", type=positive_int)
    g.add_argument("--lr", type=positive_float)
    g.add_argument("--weight-decay", type=non_negative_float)
    g.add_argument("--label-smoothing", type=non_negative_float)
    g.add_argument("--scheduler", choices=["none", "step", "cosine", "onecycle", "plateau"])
    g.add_argument("--warmup-epochs", type=non_negative_float)
    g.add_argument("--data-path", choices=["memory", "torchvision"], help="tensors on the device, or a DataLoader")
    g = p.add_argument_group("handlers")
    g.add_argument("--val-every", type=positive_int, default=1, help="validate every N epochs (and after the last)")
    g.add_argument("--patience", type=non_negative_int, default=3, help="early stopping; 0 switches it off")
    g.add_argument("--min-delta", type=non_negative_float, default=0.0)
    g.add_argument("--early-stop-warmup", type=non_negative_int, default=0, help="epochs never judged")
    g.add_argument("--n-saved", type=positive_int, default=2, help="best checkpoints kept")
    g.add_argument("--save-every-iters", type=positive_int, default=None,
                   help="also save last_*.pt every N iterations (mid-epoch, exact resume)")
    g.add_argument("--log-every", type=non_negative_int, default=50, help="batch lines every N batches (0: none)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (also off when not a terminal)")
    g.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard event files")
    g.add_argument("--tb-histograms", action="store_true", help="weight and gradient histograms (cost time)")
    g.add_argument("--tb-images-every", type=non_negative_int, default=0,
                   help="confusion matrix and misclassified digits every N epochs (0: after the last only)")
    g = p.add_argument_group("engine")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    g.add_argument("--num-workers", type=non_negative_int, default=0, help="DataLoader workers (torchvision path)")
    g.add_argument("--limit-train-batches", type=positive_int, default=None, help="cap training batches per epoch")
    g.add_argument("--amp", choices=["bf16", "fp16"], default=None, help="mixed precision")
    g.add_argument("--accumulation-steps", type=positive_int, default=1)
    g.add_argument("--clip-grad-norm", type=positive_float, default=None)
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    g = p.add_argument_group("distributed (or launch with torchrun)")
    g.add_argument("--nproc-per-node", type=positive_int, default=None,
                   help="spawn this many processes here (idist.Parallel); --batch-size stays global")
    g.add_argument("--backend", choices=["gloo", "nccl"], default=None,
                   help="default: nccl with CUDA, else gloo")
    return p


def resolve_config(args: argparse.Namespace) -> dict:
    """Preset values, overridden by every flag given explicitly."""
    config = dict(PRESETS[args.preset])
    for key, value in vars(args).items():
        if value is not None or key not in config:
            config[key] = value
    return config


def check_output_dir(config: dict) -> Path:
    """The run folder; an existing run there is never overwritten without --resume."""
    from engine import ConfigError

    out = Path(config["output_dir"] or f"runs/mnist-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output-dir {out} is a file, not a folder")
    if config["resume"] is None and out.exists() and any(out.iterdir()):
        raise ConfigError(f"output dir {out} already holds a run: pass --resume auto to continue it, "
                          f"or choose another --output-dir")
    return out


# ----------------------------------------------------------------------------- data
def load_mnist(root: str, train: bool, download: bool, transform=None):
    """torchvision's MNIST from ``root`` (holding ``MNIST/raw``); downloaded if missing and allowed."""
    import torchvision
    from engine import ConfigError

    raw = Path(root) / "MNIST" / "raw"
    try:
        return torchvision.datasets.MNIST(root, train=train, download=False, transform=transform)
    except RuntimeError as exc:
        if "not found" not in str(exc):
            raise ConfigError(f"the MNIST files in {raw.resolve()} cannot be read ({str(exc)[:120]})") from None
    except (AssertionError, ValueError, IndexError, TypeError, OSError) as exc:
        raise ConfigError(explain_bad_idx(raw, train) or f"the MNIST files in {raw.resolve()} are malformed "
                          f"({type(exc).__name__}: {str(exc)[:100]})") from None
    if download:
        try:
            return torchvision.datasets.MNIST(root, train=train, download=True, transform=transform)
        except Exception as exc:  # offline, proxy, disk: all end the same way for the user
            reason = f"download failed: {str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}"
    else:
        reason = "downloading is switched off"
    raise ConfigError(f"MNIST not found in {raw.resolve()} ({reason}); put the four IDX files there, "
                      f"or point --data-dir / MNIST_ROOT at a folder holding MNIST/raw")


IDX_TYPES = {0x08: "uint8", 0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}


def explain_bad_idx(raw: Path, train: bool) -> str | None:
    """Name what is wrong with MNIST IDX files that torchvision could not read, from their headers."""
    prefix, name = ("train", "training") if train else ("t10k", "test")
    for kind in ("images", "labels"):
        path = raw / f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
        header = path.read_bytes()[:8] if path.is_file() else b""
        if len(header) < 8:
            return f"{path} is not an IDX file (too short)"
        code, count = header[2], int.from_bytes(header[4:8], "big")
        if count == 0:
            return f"the {name} set is empty: {path} holds 0 samples"
        if code != 0x08:
            what = "class labels" if kind == "labels" else "pixels"
            return f"{path} holds {IDX_TYPES.get(code, hex(code))} values; MNIST {what} must be uint8"
    return None


def check_dataset(images: torch.Tensor, labels: torch.Tensor, name: str, num_classes: int = 10) -> None:
    """Fail early, in one line, on data the model cannot learn from."""
    from engine import ConfigError

    if images.shape[0] == 0:
        raise ConfigError(f"the {name} set is empty: check --data-dir")
    if images.shape[0] != labels.shape[0]:
        raise ConfigError(f"the {name} set has {images.shape[0]} images but {labels.shape[0]} labels")
    if tuple(images.shape[1:]) != (28, 28):
        raise ConfigError(f"the {name} set has images of shape {tuple(images.shape[1:])}; the model needs 28x28")
    if labels.is_floating_point() or labels.is_complex():
        raise ConfigError(f"the {name} set has {labels.dtype} labels; class labels must be integers")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ConfigError(f"the {name} set has labels in [{low}, {high}]; they must lie in [0, {num_classes - 1}]")


def make_loaders(config: dict, device: torch.device, progress=None, rank: int = 0, world: int = 1):
    """(train_loader, val_loader, order_state): ``order_state`` (the in-memory loader or the sampler)
    holds the data order, for checkpoints; ``progress`` tells it the trainer's place in the epoch.

    In a distributed run each rank gets its shard: training batches of ``batch_size / world``
    (``--batch-size`` is global), and a disjoint, unpadded part of the validation set."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import transforms

    from engine import InMemoryLoader, ResumableRandomSampler

    download = not config["no_download"]
    limit = config["limit_train_batches"]
    batch = config["batch_size"] // world
    shard = dict(rank=rank, world_size=world)
    if config["data_path"] == "memory":
        sets = [load_mnist(config["data_dir"], train, download) for train in (True, False)]
        for ds, name in zip(sets, ("training", "test")):
            check_dataset(ds.data, ds.targets, name)
        x_train, x_val = ((ds.data.float().div_(255).sub_(MNIST_MEAN).div_(MNIST_STD)).unsqueeze_(1) for ds in sets)
        train = InMemoryLoader(x_train, sets[0].targets, batch, shuffle=True, seed=config["seed"], device=device,
                               max_batches=limit, **shard)
        val = InMemoryLoader(x_val, sets[1].targets, config["val_batch_size"], shuffle=False, device=device, **shard)
        return train, val, train
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))])
    sets = [load_mnist(config["data_dir"], train, download, tf) for train in (True, False)]
    for ds, name in zip(sets, ("training", "test")):
        check_dataset(ds.data, ds.targets, name)
    kw = dict(num_workers=config["num_workers"], pin_memory=device.type == "cuda",
              persistent_workers=config["num_workers"] > 0)

    def samples_done() -> int | None:  # the sampler counts samples, the trainer batches
        batches = progress() if progress is not None else None
        return None if batches is None else batches * batch

    sampler = ResumableRandomSampler(len(sets[0]), seed=config["seed"], progress=samples_done,
                                     max_samples=limit * batch if limit else None, **shard)
    train = DataLoader(sets[0], batch_size=batch, sampler=sampler,
                       generator=torch.Generator().manual_seed(config["seed"]), **kw)
    val_set = Subset(sets[1], range(rank, len(sets[1]), world)) if world > 1 else sets[1]
    val = DataLoader(val_set, batch_size=config["val_batch_size"], shuffle=False, **kw)
    return train, val, sampler


def make_optimizer(config: dict, model: nn.Module) -> torch.optim.Optimizer:
    name, lr, wd = config["optimizer"], config["lr"], config["weight_decay"]
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr, weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=wd)


# ----------------------------------------------------------------------------- run
def epoch_progress(trainer) -> int | None:
    """Batches of the current epoch the trainer has done; None at an epoch boundary."""
    state = trainer.state
    if not state.epoch_length or state.iteration % state.epoch_length == 0:
        return None
    return state.iteration - (state.epoch - 1) * state.epoch_length


def build(argv: list[str] | None = None) -> SimpleNamespace:
    """Everything up to ``trainer.run``: settings, data, model, engines, handlers, resume."""
    args = build_parser().parse_args(argv)
    config = resolve_config(args)

    import ignite.distributed as idist

    from engine import ConfigError, RunLock, create_evaluator, create_trainer, default_metrics, resolve_device
    from handlers import (
        ConsoleLogger, EarlyStopping, GracefulStop, History, LRSchedule, MisclassifiedCollector, NanGuard, Progress,
        RNGState, SampleCount, TensorBoardLogging, TrainingCheckpoint, TrainMetrics, Validation,
        find_resume_checkpoint, load_checkpoint, progress_wanted, restore, seed_everything, write_json_atomic,
        write_line,
    )  # fmt: skip

    if config["threads"]:
        torch.set_num_threads(config["threads"])
    rank, world = idist.get_rank(), idist.get_world_size()
    device = resolve_device(config["device"])
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", idist.get_local_rank())
        torch.cuda.set_device(device)
    if config["warmup_epochs"] >= config["epochs"]:
        raise ConfigError(f"--warmup-epochs ({config['warmup_epochs']}) must be less than --epochs ({config['epochs']})")
    if config["batch_size"] % world:
        raise ConfigError(f"--batch-size {config['batch_size']} is global: it must divide among {world} processes")
    out = check_output_dir(config) if rank == 0 else Path(config["output_dir"] or "")
    if world > 1 and not config["output_dir"]:
        raise ConfigError("a distributed run needs an explicit --output-dir (every process must agree on it)")
    resume_state = None
    if config["resume"] not in (None, "auto"):
        path = Path(config["resume"])
        resume_state = (path, load_checkpoint(path))  # a bad file fails here, before any work
    started = time.perf_counter()

    # data
    seed_everything(config["seed"])
    trainer_ref: list = []
    train_loader, val_loader, data_state = make_loaders(config, device, lambda: epoch_progress(trainer_ref[0]),
                                                        rank=rank, world=world)

    # model and optimizer
    model = (FastNet(config["width"] or 16) if config["model"] == "fast" else SeedNet()).to(device)
    if config["channels_last"]:
        model.to(memory_format=torch.channels_last)  # before DDP, which fixes its buckets' strides
    optimizer = idist.auto_optim(make_optimizer(config, model))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config["label_smoothing"])
    train_model = idist.auto_model(model) if world > 1 else model  # DDP: gradients averaged over ranks
    run_model = torch.compile(train_model) if config["compile"] else train_model
    eval_model = run_model if world == 1 else model  # no collectives in evaluation: shards may differ in size

    # engines
    tensorboard = not config["no_tensorboard"]
    trainer = create_trainer(run_model, optimizer, loss_fn, device=device, amp=config["amp"],
                             accumulation_steps=config["accumulation_steps"], clip_grad_norm=config["clip_grad_norm"],
                             grad_norm_every=config["log_every"] if tensorboard else 0,
                             channels_last=config["channels_last"])
    trainer_ref.append(trainer)
    evaluator = create_evaluator(eval_model, {**default_metrics(nn.CrossEntropyLoss()), "samples": SampleCount()},
                                 device=device, amp=config["amp"], channels_last=config["channels_last"])

    # the run folder: one run at a time; rank 0 writes every file
    lock = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out).acquire()

    # handlers (their order of execution is fixed by stage, not by the order below)
    train_metrics = TrainMetrics().attach(trainer)
    Validation(evaluator, val_loader, every=config["val_every"]).attach(trainer)
    schedule = LRSchedule(config["scheduler"], optimizer, epochs=config["epochs"], epoch_length=len(train_loader),
                          warmup_epochs=config["warmup_epochs"]).attach(trainer)
    history = History(out / "history.json", extra={"lr": lambda: schedule.lr}).attach(trainer)
    early_stopping = EarlyStopping(trainer, patience=config["patience"], min_delta=config["min_delta"],
                                   warmup=config["early_stop_warmup"], log=write_line).attach()
    nan_guard = NanGuard(log=write_line).attach(trainer)
    to_save = {"model": model, "optimizer": optimizer, "trainer": trainer, "lr_schedule": schedule,
               "early_stopping": early_stopping, "history": history, "train_metrics": train_metrics,
               "rng": RNGState(), "data": data_state}
    if trainer.scaler is not None:
        to_save["scaler"] = trainer.scaler
    checkpoint = TrainingCheckpoint(out / "checkpoints", to_save, n_saved=config["n_saved"],
                                    skip_if=lambda: nan_guard.triggered).attach(trainer)
    if config["save_every_iters"]:
        checkpoint.attach_every(trainer, config["save_every_iters"])
    stop = GracefulStop(checkpoint, log=write_line).attach(trainer)
    ConsoleLogger(train_metrics, log_every=config["log_every"]).attach(trainer)
    collector = MisclassifiedCollector().attach(evaluator) if tensorboard else None
    if progress_wanted(config["no_progress"]):
        Progress().attach(trainer, evaluator)

    # resume
    if config["resume"] == "auto":
        resume_state = find_resume_checkpoint(out / "checkpoints", log=write_line)
        if resume_state is None:
            write_line(f"No checkpoint in {out / 'checkpoints'}: starting a new run")
    if resume_state is not None:
        path, state = resume_state
        restore(to_save, state, path)
        checkpoint.load_bookkeeping(state, path)
        write_line(f"Resumed from {path} (epoch {trainer.state.epoch}, iteration {trainer.state.iteration})")
        config["resumed_from"] = str(path)
    if rank == 0:
        write_json_atomic(out / "config.json", {**config, "device": str(device), "output_dir": str(out),
                                                "world_size": world})
    tb = None
    if tensorboard and rank == 0:
        tb = TensorBoardLogging(out / "tb", log_every=config["log_every"], lr=lambda: schedule.lr, collector=collector,
                                model=model, histograms=config["tb_histograms"],
                                purge_step=trainer.state.iteration + 1 if trainer.state.iteration else None,
                                denormalize=lambda x: x * MNIST_STD + MNIST_MEAN, history=history,
                                images_every=config["tb_images_every"]).attach(trainer)
    return SimpleNamespace(config=config, out=out, trainer=trainer, train_loader=train_loader, history=history,
                           checkpoint=checkpoint, nan_guard=nan_guard, stop=stop, tb=tb, lock=lock, started=started)


def train(run: SimpleNamespace) -> None:
    """``trainer.run`` up to ``--epochs`` (or until a handler stops it)."""
    done = run.trainer.state.epoch >= run.config["epochs"] and not epoch_progress(run.trainer)
    if not done:
        run.trainer.run(run.train_loader, max_epochs=run.config["epochs"])


def finish(run: SimpleNamespace) -> int:
    """Write the last records, print the summary, release the run folder; the exit code."""
    from handlers import write_line

    try:
        run.history.write()
        best = run.history.best()
        if run.tb is not None:
            final = run.history.epochs[-1].get("val_accuracy") if run.history.epochs else None
            run.tb.log_hparams(run.config, {"hparam/best_val_accuracy": best and best["val_accuracy"],
                                            "hparam/final_val_accuracy": final})
    finally:
        close(run)
    out, checkpoint = run.out, run.checkpoint
    if best is not None:
        write_line(f"Best val accuracy: {best['val_accuracy'] * 100:.2f}% at epoch {best['epoch']} "
                   f"({len(run.history.epochs)} epoch(s) in all, this process {time.perf_counter() - run.started:.1f} s)")
    write_line(f"Checkpoints: {out / 'checkpoints'} (best: {checkpoint.best_path and checkpoint.best_path.name}, "
               f"last: {checkpoint.last_path and checkpoint.last_path.name})")
    write_line(f"History: {out / 'history.json'}")
    if run.tb is not None:
        write_line(f"TensorBoard: tensorboard --logdir {out / 'tb'}")
    if run.stop.exit_code is not None:
        return run.stop.exit_code
    return EXIT_NAN if run.nan_guard.triggered else 0


def close(run: SimpleNamespace) -> None:
    run.stop.uninstall()
    if run.tb is not None:
        run.tb.close()
    if run.lock is not None:
        run.lock.release()


def run_one_process(argv: list[str] | None = None) -> int:
    """This process's share of the run (the whole run without distribution); the exit code."""
    run = build(argv)
    try:
        train(run)
    except BaseException:
        close(run)
        raise
    return finish(run)


def _rank_main(local_rank: int, argv: list[str] | None, codes: list) -> None:
    codes.append(run_one_process(argv))


def _spawned_rank(local_rank: int, argv: list[str] | None) -> None:
    """A process spawned by ``--nproc-per-node``: errors end it with our exit codes, as a script would."""
    from engine import ConfigError

    try:
        code = run_one_process(argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    if code:
        sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    logging.getLogger("ignite").addHandler(logging.NullHandler())  # errors reach the user as our one line
    args = build_parser().parse_args(argv)
    import ignite.distributed as idist
    from ignite.utils import setup_logger

    from engine import ConfigError

    for name in ("ignite.distributed.launcher.Parallel", "ignite.distributed.auto.auto_model"):
        setup_logger(name, level=logging.WARNING)  # our console lines only

    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # by torchrun (or another launcher)
    if args.nproc_per_node and args.nproc_per_node > 1:
        if launched:
            raise ConfigError("--nproc-per-node spawns processes itself: do not also launch with torchrun")
        from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

        try:
            with idist.Parallel(backend=backend, nproc_per_node=args.nproc_per_node, master_port=free_port()) as p:
                p.run(_spawned_rank, argv)
        except ProcessExitedException as exc:
            return exc.exit_code if exc.exit_code and exc.exit_code > 0 else 1
        except ProcessRaisedException as exc:
            last = str(exc).strip().splitlines()[-1] if str(exc).strip() else "a training process failed"
            print(f"error: a training process failed: {last}", file=sys.stderr)
            return 1
        return 0
    if launched:
        codes: list[int] = []
        with idist.Parallel(backend=backend) as p:  # takes rank and world from the launcher's environment
            p.run(_rank_main, argv, codes)
        return codes[0] if codes else 1
    return run_one_process(argv)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    from engine.errors import CheckpointSaveError, ConfigError

    try:
        sys.exit(main())
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except CheckpointSaveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_SAVE)
    except KeyboardInterrupt:
        print("Interrupted before training started; nothing was saved", file=sys.stderr)
        sys.exit(130)
    except OSError as exc:  # disk full or read-only outside checkpointing (history, config, events)
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}; checkpoints already saved are intact",
              file=sys.stderr)
        sys.exit(EXIT_SAVE)
