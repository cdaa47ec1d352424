"""What differs between the processes of a run is kept per rank (one process here; the multi-process
behaviour is tested for real in test_distributed.py)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn

from engine import ConfigError, InMemoryLoader, create_trainer, distributed
from engine.distributed import PeerLost, PerRank, is_peer_failure


def loader() -> InMemoryLoader:
    return InMemoryLoader(torch.randn(10, 2), torch.arange(10), 3, seed=1)


def test_per_rank_state_holds_the_world_size_and_one_state_per_rank():
    wrapped = PerRank(loader(), "data position")
    state = wrapped.state_dict()
    assert state["world_size"] == 1 and len(state["ranks"]) == 1 and state["ranks"][0]["seed"] == 1
    other = loader()
    PerRank(other).load_state_dict(state)
    assert other.state_dict()["epoch"] == 0


def test_a_state_of_another_world_size_is_refused_naming_both():
    state = {"world_size": 2, "ranks": [loader().state_dict()] * 2}
    with pytest.raises(ConfigError, match=r"run of 2 process\(es\) and its data position differs .* this run has 1"):
        PerRank(loader(), "data position").load_state_dict(state)


def test_a_state_saved_before_ranks_were_kept_loads_as_it_is():
    old = loader().state_dict()  # format 2 files hold the object's own state
    PerRank(loader()).load_state_dict(old)


@pytest.mark.parametrize("message, peer", [
    ("[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:50600: Connection reset by peer", True),
    ("Connection closed by peer [127.0.0.1]:1234", True),
    ("mat1 and mat2 shapes cannot be multiplied (4x3 and 2x1)", False),
])
def test_a_collective_broken_by_a_dead_peer_is_told_from_other_errors(message, peer):
    assert is_peer_failure(RuntimeError(message)) is peer
    assert not is_peer_failure(ValueError(message))


@pytest.mark.parametrize("ranks, text", [([1], "rank 1 of the run failed; rank 0 stops too"),
                                         ([2, 3], "ranks 2, 3 of the run failed; rank 0 stops too"),
                                         ([], "another process of the run failed; rank 0 stops too")])
def test_the_peer_line_names_the_ranks_that_failed(ranks, text):
    assert str(PeerLost(ranks, 0)) == text


@pytest.fixture
def two_ranks(monkeypatch):
    """Rank 0 of a run of 2 on an in-memory store, and a real process whose pid rank 1 holds."""
    store = dist.HashStore()
    monkeypatch.setattr(distributed, "_store", store)
    monkeypatch.setattr(distributed, "dist", SimpleNamespace(is_initialized=lambda: True, get_rank=lambda: 0,
                                                             get_world_size=lambda: 2))  # fmt: skip
    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    store.set("process/1", distributed._process_id().rsplit(" ", 1)[0] + f" {peer.pid}")
    yield store, peer
    peer.kill()
    peer.wait()


@pytest.mark.skipif(not distributed._process_id(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("reaped", [False, True])  # a zombie its launcher has not waited for yet, or gone
def test_a_peer_whose_process_ended_on_this_machine_is_named_without_waiting(two_ranks, reaped):
    store, peer = two_ranks
    here = distributed._process_id()
    assert not distributed._ended(1, here)  # alive: it may still answer
    peer.kill()
    if reaped:
        peer.wait()
    else:
        while Path(f"/proc/{peer.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)
    assert distributed._ended(1, here)
    start = time.monotonic()
    assert distributed.missing_ranks(wait_s=60) == [1]
    assert time.monotonic() - start < 30  # not the 60 s wait for an answer that cannot come
    assert store.get("alive/0") == b"1"


def test_a_silent_peer_elsewhere_or_alive_is_waited_for(two_ranks):
    store, peer = two_ranks
    here = distributed._process_id()
    store.set("process/1", f"another-boot pid:[1] {peer.pid}")  # another machine: its pid means nothing here
    peer.kill()
    peer.wait()
    assert not distributed._ended(1, here)
    start = time.monotonic()
    assert distributed.missing_ranks(wait_s=0.3) == [1]
    assert time.monotonic() - start >= 0.3
    store.set("alive/1", "1")  # a peer that answers is not missing
    assert distributed.missing_ranks(wait_s=0.3) == []


def test_the_trainer_puts_the_module_inside_a_wrapper_back_in_training_mode():
    """An evaluator given the module inside DDP (or torch.compile) switches it to eval without touching
    the wrapper's flag: the trainer must look at the module itself."""
    net = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    wrapper = nn.DataParallel(net)  # DDP needs a process group; both are unwrapped the same way
    trainer = create_trainer(wrapper, torch.optim.SGD(wrapper.parameters(), lr=0.1), nn.CrossEntropyLoss())
    net.eval()
    assert wrapper.training and not net.training
    trainer.run([(torch.randn(8, 2), torch.randint(0, 2, (8,)))], max_epochs=1)
    assert net.training and net[1].training
