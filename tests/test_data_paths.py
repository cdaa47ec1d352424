"""Which path data takes, batch transforms, per-batch seeding, streams, dict batches: in-process, small."""

from __future__ import annotations

import dataclasses
import random
import re
import time

import pytest
import torch
from ignite.engine import Events
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, TensorDataset
from torchvision.transforms import v2

from engine import ConfigError, InMemoryLoader, ResumableRandomSampler, RunSettings
from engine.batch import split_batch
from engine.seeding import SeededDataset, batch_generator
from engine.stream import StreamLoader, sharded_batches
from engine.transforms import Compose, RandomCrop, RandomHorizontalFlip
from handlers import fit, seed_everything
from handlers.loaders import data_route, make_loaders

QUIET = dict(progress=False, log_every=0, tensorboard=False, patience=0)


class Augmenting(Dataset):
    """Random crop and flip in ``__getitem__`` (torch's RNG); counts its calls."""

    def __init__(self, n: int = 64) -> None:
        self.x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        self.y = torch.arange(n) % 3
        self.tf = v2.Compose([v2.RandomCrop(8, padding=2), v2.RandomHorizontalFlip()])
        self.calls = 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        self.calls += 1
        return self.tf(self.x[i]), self.y[i]


class Stream(IterableDataset):
    """Items 0..n-1; ``shard``: each DataLoader worker takes its share, as PyTorch asks of a stream."""

    def __init__(self, n: int, shard: bool = False) -> None:
        self.n, self.shard = n, shard

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        start, step = (info.id, info.num_workers) if self.shard and info is not None else (0, 1)
        for i in range(start, self.n, step):
            yield torch.full((3,), float(i)), i % 2


class SampleLog:
    """Every training sample of every epoch, as bytes (to count repeats across epochs)."""

    def __init__(self) -> None:
        self.epochs: dict[int, set[bytes]] = {}

    def attach(self, trainer) -> SampleLog:
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self)
        return self

    def __call__(self, engine) -> None:
        x = engine.state.batch[0].cpu()  # on the run's device (a GPU's for the in-memory path)
        self.epochs.setdefault(engine.state.epoch, set()).update(s.numpy().tobytes() for s in x)


def flat_net(features: int, classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(features, classes))


@pytest.mark.parametrize("data, path, expected", [
    ((torch.zeros(4, 2), torch.zeros(4)), "auto", "memory"),
    (TensorDataset(torch.zeros(4, 2), torch.zeros(4)), "auto", "memory"),
    (Augmenting(), "auto", "loader"),
    (Augmenting(), "memory", "memory"),
    ((torch.zeros(4, 2), torch.zeros(4)), "loader", "loader"),
    (Stream(4), "auto", "stream"),
    (Stream(4), "loader", "stream"),
])  # fmt: skip
def test_the_path_follows_the_data(data, path, expected):
    assert data_route(data, path) == expected


def test_torchvision_is_the_old_name_of_loader_and_a_stream_is_not_read_into_memory():
    assert RunSettings(data_path="torchvision").data_path == "loader"
    assert RunSettings().data_path == "auto"
    with pytest.raises(ConfigError, match="a stream \\(IterableDataset\\) cannot be read into memory"):
        data_route(Stream(4), "memory")
    with pytest.raises(ConfigError, match="epoch_length is for streams"):
        make_loaders(Augmenting(), Augmenting(), RunSettings(epoch_length=3), torch.device("cpu"))


def test_default_settings_draw_a_datasets_augmentation_afresh_every_epoch(tmp_path):
    data, log = Augmenting(64), SampleLog()
    fit(flat_net(192), data, Augmenting(16), RunSettings(output_dir=str(tmp_path / "r"), epochs=3, batch_size=16,
                                                         **QUIET), handlers=[log])  # fmt: skip
    assert data.calls >= 3 * 64
    for epoch in (2, 3):
        assert len(log.epochs[1] & log.epochs[epoch]) < 64 * 0.2  # a crop of 2 and a flip: few repeats


def test_asked_into_memory_a_dataset_is_read_once_and_says_its_transforms_are_drawn_once(tmp_path, capsys):
    data, log = Augmenting(64), SampleLog()
    fit(flat_net(192), data, Augmenting(16), RunSettings(output_dir=str(tmp_path / "r"), epochs=2, batch_size=16,
                                                         data_path="memory", **QUIET), handlers=[log])  # fmt: skip
    assert data.calls == 64 and log.epochs[1] == log.epochs[2]
    out = capsys.readouterr().out
    assert ("Reading the training set into memory (64 samples, 48.5 KB): random transforms in its __getitem__ are "
            "drawn once, not every epoch (data_path='loader' draws them afresh)") in out


def test_seeded_batches_depend_on_epoch_and_batch_only_and_leave_the_global_rng_alone():
    data = SeededDataset(Augmenting(8), seed=3)
    torch.manual_seed(0)
    before = torch.get_rng_state(), random.getstate()
    a = data.__getitems__([(1, 5), (1, 2)])
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    torch.manual_seed(123)  # another global state: the same draws
    b = data.__getitems__([(1, 5), (1, 2)])
    c = data.__getitems__([(2, 5), (2, 2)])
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c))


def test_a_keyed_sampler_yields_epochs_and_keeps_them_through_its_state():
    sampler = ResumableRandomSampler(6, seed=1, keyed=True)
    first, second = list(sampler), list(sampler)
    assert {e for e, _ in first} == {1} and {e for e, _ in second} == {2}
    again = ResumableRandomSampler(6, seed=1, keyed=True)
    again.load_state_dict({**sampler.state_dict(), "position": None})
    assert {e for e, _ in again} == {3}


def test_random_crop_and_flip_draw_per_sample_from_the_generator():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6).repeat(32, 1, 1, 1)
    crop = RandomCrop(2)
    out = crop(x, batch_generator(0, 1, 1, "cpu"))
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    windows = [{(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(padded[i, :, dy:dy + 6, dx:dx + 6], o)}
               for i, o in enumerate(out)]
    assert all(windows) and len({min(w) for w in windows}) > 5  # each a true window; offsets differ per sample
    assert torch.equal(out, crop(x, batch_generator(0, 1, 1, "cpu")))  # same (seed, epoch, iteration): same
    flipped = RandomHorizontalFlip()(x, batch_generator(0, 1, 2, "cpu"))
    same = [torch.equal(f, o) for f, o in zip(flipped, x)]
    assert all(torch.equal(f, o) or torch.equal(f, o.flip(2)) for f, o in zip(flipped, x))
    assert 0 < sum(same) < len(same)
    assert "RandomCrop(padding=2)" in repr(Compose(crop, RandomHorizontalFlip()))
    with pytest.raises(ValueError, match=r"RandomCrop takes a batch of images \[N, C, H, W\], got \(3, 6, 6\)"):
        crop(x[0], batch_generator(0, 1, 1, "cpu"))


def test_the_fast_path_applies_train_transform_to_training_batches_only(tmp_path):
    seen = []

    def transform(x, generator):
        seen.append(x.shape[0])
        return RandomHorizontalFlip()(x, generator)

    x, y = torch.rand(40, 3, 4, 4), torch.arange(40) % 3
    seed_everything(0)
    result = fit(flat_net(48), (x, y), (x, y), RunSettings(output_dir=str(tmp_path / "r"), epochs=2, batch_size=16,
                                                           **QUIET), train_transform=transform)  # fmt: skip
    assert result.exit_code == 0 and seen == [16, 16, 8] * 2


def test_a_stream_trains_one_pass_an_epoch_or_epoch_length_batches_going_on(tmp_path):
    log = SampleLog()
    result = fit(flat_net(3, 2), Stream(50), Stream(10), RunSettings(output_dir=str(tmp_path / "a"), epochs=2,
                                                                       batch_size=16, **QUIET), handlers=[log])
    assert [r["iteration"] for r in result.history] == [4, 8] and log.epochs[1] == log.epochs[2]
    log = SampleLog()
    result = fit(flat_net(3, 2), Stream(50), Stream(10), RunSettings(output_dir=str(tmp_path / "b"), epochs=3,
                                                                       batch_size=10, epoch_length=2, **QUIET),
                 handlers=[log])  # fmt: skip
    assert [r["iteration"] for r in result.history] == [2, 4, 6]
    items = [sorted(int(torch.frombuffer(bytearray(b), dtype=torch.float32)[0]) for b in log.epochs[e])
             for e in (1, 2, 3)]
    assert items == [list(range(20)), list(range(20, 40)), [*range(10), *range(40, 50)]]  # going on, pass after pass


def test_a_schedule_over_the_run_needs_a_streams_epoch_length(tmp_path):
    with pytest.raises(ConfigError, match="scheduler onecycle .* needs the length of an epoch, which a stream does "
                                          "not tell: set epoch_length"):
        fit(flat_net(3, 2), Stream(20), Stream(10), RunSettings(output_dir=str(tmp_path / "r"), scheduler="onecycle",
                                                                **QUIET))  # fmt: skip


UNSHARDED = "stream gives each of its 2 DataLoader workers the same items (its first two batches are equal"


def test_equal_first_batches_from_two_workers_stop_before_the_second_is_trained_on():
    batches = [(torch.arange(4.0), torch.zeros(4))] * 2 + [(torch.ones(4), torch.zeros(4))]
    seen = sharded_batches(iter([(a.clone(), b.clone()) for a, b in batches]), 2, "training")
    next(seen)[0].add_(1)  # a step that changes its batch in place changes nothing here
    with pytest.raises(ConfigError, match=re.escape(f"the training {UNSHARDED}, one from each worker): shard it in "
                                                    f"__iter__ by torch.utils.data.get_worker_info()")):
        next(seen)
    assert len(list(sharded_batches(iter(batches), 1, "training"))) == 3  # one worker: each batch its own
    assert len(list(sharded_batches(iter(batches[1:]), 2, "training"))) == 2


@pytest.mark.parametrize("unsharded", ["training", "validation"])
def test_a_stream_read_by_two_workers_must_shard_itself(tmp_path, unsharded):
    settings = RunSettings(output_dir=str(tmp_path / "r"), epochs=2, batch_size=8, num_workers=2, **QUIET)
    train, val = Stream(40, shard=unsharded != "training"), Stream(16, shard=unsharded != "validation")
    with pytest.raises(ConfigError, match=re.escape(f"the {unsharded} {UNSHARDED}")):
        fit(flat_net(3, 2), train, val, settings)
    log = SampleLog()
    result = fit(flat_net(3, 2), Stream(40, shard=True), Stream(16, shard=True),
                 dataclasses.replace(settings, output_dir=str(tmp_path / "s")), handlers=[log])
    assert result.exit_code == 0 and [len(log.epochs[e]) for e in (1, 2)] == [40, 40]
    assert [r["iteration"] for r in result.history] == [6, 12] and result.history[-1]["val_samples"] == 16  # 8+8+4 each


class Pairs(IterableDataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __iter__(self):
        yield from zip(self.x, self.y)


@pytest.mark.parametrize("form, batch_norm, limit, batches", [
    ("tensors", True, None, 6), ("dataset", True, None, 6), ("stream", True, None, 6),
    ("tensors", False, None, 7), ("dataset", True, 6, 6), ("tensors", True, 7, 6),
])  # fmt: skip
def test_a_last_batch_of_one_sample_is_left_out_for_batch_norm_and_said(tmp_path, capsys, form, batch_norm, limit,
                                                                         batches):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(97, 4, generator=g), torch.randint(0, 3, (97,), generator=g)  # 6 batches of 16, then 1
    data = {"tensors": (x, y), "dataset": TensorDataset(x, y), "stream": Pairs(x, y)}[form]
    norm = nn.BatchNorm1d(8) if batch_norm else nn.Identity()
    net = nn.Sequential(nn.Linear(4, 8), norm, nn.ReLU(), nn.Linear(8, 3))
    result = fit(net, data, (x[:20], y[:20]), RunSettings(output_dir=str(tmp_path / "r"), epochs=2, batch_size=16,
                                                          limit_train_batches=limit, **QUIET))  # fmt: skip
    said = capsys.readouterr().out
    assert result.exit_code == 0 and [r["iteration"] for r in result.history] == [batches, 2 * batches]
    sized = ("The training set's last batch would hold 1 sample (97 samples in batches of 16), which BatchNorm cannot "
             "train on: it is left out each epoch (a different sample each time, in the new order)")
    streamed = ("The training stream's pass ended in a batch of 1 sample (batches of 16), which BatchNorm cannot "
                "train on: it is left out (and any such batch after it)")
    assert said.count(sized) == (batch_norm and form != "stream" and limit != 6)
    assert said.count(streamed) == (form == "stream")


def test_a_stream_loader_refuses_a_stream_that_yields_nothing():
    loader = StreamLoader(DataLoader(Stream(0), batch_size=2), epoch_length=3)
    with pytest.raises(ConfigError, match="the training stream yielded no batch"):
        next(iter(loader))


@pytest.mark.parametrize("batch, inputs", [
    ({"image": torch.ones(2, 3), "label": torch.zeros(2)}, "tensor"),
    ({"input_ids": torch.ones(2, 3), "attention_mask": torch.ones(2, 3), "labels": torch.zeros(2)}, "dict"),
    ([torch.ones(2, 3), torch.zeros(2)], "tensor"),
])  # fmt: skip
def test_batches_split_into_inputs_and_targets(batch, inputs):
    x, y = split_batch(batch)
    assert isinstance(x, torch.Tensor if inputs == "tensor" else dict) and torch.equal(y, torch.zeros(2))


@pytest.mark.parametrize("batch, message", [
    ({"image": torch.ones(2)}, "a batch is a dict with keys image: name the target label/labels/target/targets/y"),
    ((torch.ones(2), torch.ones(2), torch.ones(2)), "a batch must be \\(inputs, targets\\) or a dict with a target "
                                                    "key, got a tuple of 3: pass prepare_batch="),
])  # fmt: skip
def test_a_batch_that_cannot_be_split_says_so_in_one_line(batch, message):
    with pytest.raises(ConfigError, match=message):
        split_batch(batch)


def test_a_memory_loader_still_takes_tensors_directly():
    loader = InMemoryLoader(torch.zeros(10, 2), torch.zeros(10), 4, shuffle=False)
    assert [b[0].shape[0] for b in loader] == [4, 4, 2]


def test_progress_over_a_stream_counts_without_a_total_until_the_first_pass_ends(capsys):
    from ignite.engine import Engine

    from engine.stream import make_stream_loader
    from handlers.progress import Progress

    trainer = Engine(lambda engine, batch: {"loss": torch.tensor(1.0)})
    Progress(every=2).attach(trainer)
    state = trainer.run(StreamLoader(make_stream_loader(Stream(45), 4)), max_epochs=2)
    err = capsys.readouterr().err
    assert state.epoch_length == 12 and "Epoch [1/2]: [10/?]" in err and "Epoch [2/2]: [10/12]" in err


class ClassCount:
    """Training samples seen per class; raises at iteration ``crash_at`` (a crash mid-epoch)."""

    def __init__(self, crash_at: int | None = None) -> None:
        self.counts, self.crash_at = torch.zeros(2), crash_at

    def attach(self, trainer) -> ClassCount:
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self)
        return self

    def __call__(self, engine) -> None:
        self.counts += torch.bincount(engine.state.batch[1].cpu(), minlength=2)
        if engine.state.iteration == self.crash_at:
            raise RuntimeError("crash")


@pytest.mark.parametrize("form", ["tensors", "dataset"])
def test_sample_weights_draw_classes_evenly_and_a_crashed_run_resumes_to_the_same_draws(tmp_path, form):
    g = torch.Generator().manual_seed(0)
    y = (torch.arange(200) < 20).long()  # 180 of class 0, 20 of class 1
    x = torch.randn(200, 4, generator=g) + y[:, None]
    data = (x, y) if form == "tensors" else TensorDataset(x, y)
    weights = (1 / torch.bincount(y).double())[y]

    def run(out: str, count: ClassCount, **kw):
        seed_everything(0)
        return fit(flat_net(4, 2), data, (x, y), RunSettings(output_dir=str(tmp_path / out), epochs=3, batch_size=20,
                                                             save_every_iters=3, **QUIET, **kw),
                   sample_weights=weights, handlers=[count])  # fmt: skip

    seen = ClassCount()
    straight = run("straight", seen)
    assert seen.counts.sum() == 600 and 0.4 < seen.counts[1] / 600 < 0.6  # 10% of the set, half the draws
    with pytest.raises(RuntimeError, match="crash"):
        run("crashed", ClassCount(crash_at=16))  # mid-epoch 2 (10 batches an epoch), saved at 15
    resumed = run("crashed", ClassCount(), resume="auto")
    timing = ("epoch_seconds", "samples_per_second")
    assert [{k: v for k, v in r.items() if k not in timing} for r in resumed.history] == \
        [{k: v for k, v in r.items() if k not in timing} for r in straight.history]  # fmt: skip


def test_sample_weights_are_refused_for_a_stream_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"sample_weights need a set with a length, one weight per sample; a stream "
                                          r"\(IterableDataset\) is read in its own order"):
        fit(flat_net(3, 2), Stream(20), Stream(10), RunSettings(output_dir=str(tmp_path / "r"), **QUIET),
            sample_weights=torch.ones(20))


class SlowSamples(Dataset):
    """``delay`` seconds a sample, as decoding files is."""

    def __init__(self, n: int, delay: float) -> None:
        self.x, self.y, self.delay = torch.randn(n, 4), torch.arange(n) % 2, delay

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        time.sleep(self.delay)
        return self.x[i], self.y[i]


@pytest.mark.parametrize("delay, workers, said", [(0.004, 0, True), (0.0, 0, False), (0.004, 2, False)])
def test_a_training_that_waits_on_its_loading_says_so_once_after_the_first_epoch(tmp_path, capsys, monkeypatch,
                                                                                   delay, workers, said):
    from handlers.data_wait import DataWaitHint

    monkeypatch.setattr(DataWaitHint, "MIN_SECONDS", 0.2)  # (2 s by default)
    result = fit(flat_net(4, 2), SlowSamples(96, delay), SlowSamples(16, 0.0),
                 RunSettings(output_dir=str(tmp_path / "r"), epochs=2, batch_size=16, num_workers=workers, **QUIET))
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("Loading samples took ")]
    assert result.exit_code == 0 and len(lines) == said, out
    if said:
        assert re.fullmatch(r"Loading samples took \d+% of epoch 1 \([\d.]+ of [\d.]+ s\) in the training process: "
                            r"num_workers=\d would load the next batches while the model trains \(the same "
                            r"batches: their draws do not depend on the workers\)", lines[0]), lines[0]


class Labelled(Dataset):
    """A Dataset that keeps its labels in ``targets``, as torchvision's do (the loader path)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.targets = x, y.tolist()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.targets[i]


@pytest.mark.parametrize("form, weighted, said", [
    ("tensors", False, True), ("targets", False, True), ("tensors", True, False), ("dataset", False, False),
])  # fmt: skip
def test_imbalanced_labels_known_up_front_are_said_once(tmp_path, capsys, form, weighted, said):
    x, y = torch.randn(120, 4), (torch.arange(120) < 12).long()  # 108 against 12
    data = {"tensors": (x, y), "targets": Labelled(x, y), "dataset": Subset(TensorDataset(x, y), range(120))}[form]
    fit(flat_net(4, 2), data, (x, y), RunSettings(output_dir=str(tmp_path / "r"), epochs=1, **QUIET),
        sample_weights=(1 / torch.bincount(y).double())[y] if weighted else None)
    out = capsys.readouterr().out
    assert out.count("The training set's classes are imbalanced: class 0 has 108 samples (90.0%), class 1 12") == said
    assert data_route(data, "auto") == ("memory" if form == "tensors" else "loader")
