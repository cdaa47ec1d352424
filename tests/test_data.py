"""The in-memory loader: coverage, order, seeding, exact mid-epoch continuation, shards."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine

from engine import ConfigError, InMemoryLoader, ResumableRandomSampler


def loader(n=103, bs=10, **kw):
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    return InMemoryLoader(x, torch.arange(n), bs, **kw)


def epoch_ids(ld) -> list[int]:
    return [int(i) for _, y in ld for i in y]


@pytest.mark.parametrize("drop_last", [False, True])
def test_every_sample_once_per_epoch_and_new_order_each_epoch(drop_last):
    ld = loader(drop_last=drop_last)
    first, second = epoch_ids(ld), epoch_ids(ld)
    expected = 100 if drop_last else 103
    assert len(first) == len(set(first)) == expected and len(second) == expected
    assert first != second
    assert len(ld) == (10 if drop_last else 11)


def test_same_seed_same_order_other_seed_other_order():
    assert epoch_ids(loader(seed=3)) == epoch_ids(loader(seed=3))
    assert epoch_ids(loader(seed=3)) != epoch_ids(loader(seed=4))


def test_no_shuffle_keeps_the_stored_order():
    assert epoch_ids(loader(shuffle=False)) == list(range(103))


def test_order_does_not_depend_on_the_global_rng():
    torch.manual_seed(0)
    a = epoch_ids(loader())
    torch.manual_seed(1)
    assert epoch_ids(loader()) == a


@pytest.mark.parametrize("stop_at", [0, 1, 5, 10])
def test_exact_continuation_after_load_state_dict_mid_epoch(stop_at):
    reference = loader(seed=7)
    full = [epoch_ids(reference) for _ in range(3)]
    ld = loader(seed=7)
    epoch_ids(ld)  # epoch 1
    it = iter(ld)
    seen = [int(i) for _, y in (next(it) for _ in range(stop_at)) for i in y]
    state = ld.state_dict()
    fresh = loader(seed=7)
    fresh.load_state_dict(state)
    rest = epoch_ids(fresh)
    assert seen + rest == full[1]
    assert epoch_ids(fresh) == full[2]


@pytest.mark.parametrize("chunk, stop_at", [(1, 4), (3, 4), (3, 6), (32, 5)])
def test_batches_gathered_in_chunks_are_the_order_sliced_and_continue_exactly(monkeypatch, chunk, stop_at):
    """Whatever the batches gathered at once (and a continuation from inside a chunk): the permutation's rows,
    batch after batch, in storage of their own (not views of the data set)."""
    monkeypatch.setattr("engine.data._CHUNK_BATCHES", chunk)
    ld = loader(seed=5)
    batches = list(ld)
    order = torch.cat([y for _, y in batches])
    assert sorted(order.tolist()) == list(range(103)) and [len(y) for _, y in batches] == [10] * 10 + [3]
    assert all(torch.equal(x.squeeze(1), y.float()) for x, y in batches)
    assert all(x.untyped_storage().data_ptr() != ld.x.untyped_storage().data_ptr() for x, _ in batches)
    head = loader(seed=5)
    it = iter(head)
    for _ in range(stop_at):
        next(it)
    tail = loader(seed=5)
    tail.load_state_dict(head.state_dict())
    assert torch.equal(torch.cat([y for _, y in tail]), order[stop_at * 10:])


def test_state_at_an_epoch_end_continues_with_the_next_epoch():
    reference = loader(seed=7)
    full = [epoch_ids(reference) for _ in range(2)]
    ld = loader(seed=7)
    epoch_ids(ld)
    fresh = loader(seed=7)
    fresh.load_state_dict(ld.state_dict())
    assert epoch_ids(fresh) == full[1]


def test_state_before_any_epoch_round_trips():
    ld = loader(seed=2)
    fresh = loader(seed=99)
    fresh.load_state_dict(ld.state_dict())
    assert epoch_ids(fresh) == epoch_ids(loader(seed=2))


@pytest.mark.parametrize("world, shuffle", [(2, True), (3, True), (2, False), (3, False)])
def test_shards_across_ranks(world, shuffle):
    loaders = [loader(n=101, rank=r, world_size=world, shuffle=shuffle, seed=5) for r in range(world)]
    shards = [epoch_ids(ld) for ld in loaders]
    union = [i for s in shards for i in s]
    assert len(union) == len(set(union))  # no sample on two ranks
    if shuffle:  # training: equal shards, so every rank runs the same number of steps
        assert len({len(s) for s in shards}) == 1 and len({len(ld) for ld in loaders}) == 1
        assert len(union) == 101 - 101 % world
    else:  # evaluation: every sample exactly once, none padded
        assert sorted(union) == list(range(101))


def test_max_batches_caps_each_epoch_and_epochs_move_on():
    ld = loader(max_batches=3)
    a, b = epoch_ids(ld), epoch_ids(ld)
    assert len(ld) == 3 and len(a) == len(b) == 30 and a != b


@pytest.mark.parametrize("batches, batch_size", [(3, 1), (17, 1), (5, 3), (None, 3)])
def test_sampler_attached_to_the_trainer_continues_exactly(batches, batch_size):
    reference = ResumableRandomSampler(40, seed=1, max_samples=30)
    epochs = [list(reference) for _ in range(3)]
    assert all(len(e) == 30 == len(set(e)) for e in epochs) and epochs[0] != epochs[1]
    trainer = Engine(lambda e, b: None)
    sampler = ResumableRandomSampler(40, seed=1, max_samples=30).attach(trainer, batch_size)
    list(sampler)  # epoch 1
    second = list(sampler)  # epoch 2 drawn; the trainer is `batches` batches into it (None: at its end)
    assert second == epochs[1]
    length = 30 // batch_size
    trainer.state.epoch, trainer.state.epoch_length = 2, length
    trainer.state.iteration = length * (2 if batches is None else 1) + (batches or 0)
    fresh = ResumableRandomSampler(40, seed=99, max_samples=30)
    fresh.load_state_dict(sampler.state_dict())
    if batches is None:
        assert list(fresh) == epochs[2]
    else:
        assert list(fresh) == epochs[1][batches * batch_size :]
        assert list(fresh) == epochs[2]


@pytest.mark.parametrize(
    "kw, match",
    [({"n": 0}, "empty"), ({"bs": 0}, "batch_size"), ({"max_batches": 0}, "max_batches"),
     ({"rank": 2, "world_size": 2}, "rank")],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ConfigError, match=match):
        loader(**kw)


WEIGHTS = (torch.arange(103) % 2 * 9.0 + 1).index_fill(0, torch.tensor([5, 6]), 0.0)  # odd 10x, 5 and 6 never


@pytest.mark.parametrize("stop_at", [0, 4])
def test_weighted_draws_follow_the_weights_and_continue_exactly(stop_at):
    ld = loader(seed=7, weights=WEIGHTS)
    epochs = [epoch_ids(ld) for _ in range(3)]
    drawn = [i for e in epochs for i in e]
    assert [len(e) for e in epochs] == [103] * 3 and len(set(epochs[0])) < 103  # with replacement
    assert 5 not in drawn and 6 not in drawn and 0.85 < sum(i % 2 for i in drawn) / len(drawn) < 0.96  # 10/11
    again = loader(seed=7, weights=WEIGHTS)
    epoch_ids(again)
    it = iter(again)
    seen = [int(i) for _, y in (next(it) for _ in range(stop_at)) for i in y]
    fresh = loader(seed=7, weights=WEIGHTS)
    fresh.load_state_dict(again.state_dict())
    assert seen + epoch_ids(fresh) == epochs[1] and epoch_ids(fresh) == epochs[2]
    trainer = Engine(lambda e, b: None)  # the DataLoader's sampler: the same draws, the same continuation
    sampler = ResumableRandomSampler(103, seed=7, weights=WEIGHTS).attach(trainer, 10)
    assert list(sampler) == epochs[0] and list(sampler) == epochs[1]
    trainer.state.epoch, trainer.state.epoch_length, trainer.state.iteration = 2, 11, 11 + stop_at
    resumed = ResumableRandomSampler(103, seed=99, weights=WEIGHTS)
    resumed.load_state_dict(sampler.state_dict())
    assert list(resumed) == (epochs[1][stop_at * 10 :] if stop_at else epochs[2])


@pytest.mark.parametrize("weights, match", [
    (torch.ones(102), "sample_weights must hold one number per training sample: 103 samples, got 102"),
    (torch.ones(103, 1), r"one number per training sample: 103 samples, got a shape \[103, 1\]"),
    (torch.ones(103).index_fill(0, torch.tensor([7]), -1.0), "sample_weights must be finite and >= 0: sample 7's is "
                                                             "-1.0"),
    (torch.ones(103).index_fill(0, torch.tensor([9]), float("nan")), "must be finite and >= 0: sample 9's is nan"),
    (torch.zeros(103), "sample_weights are all 0: no sample could be drawn"),
    (["a"] * 103, "sample_weights must be numbers, one per training sample"),
])  # fmt: skip
def test_bad_weights_are_one_line(weights, match):
    with pytest.raises(ConfigError, match=match):
        loader(weights=weights)
