"""A stop signal, wherever in an iteration it lands, saves a state the resume continues exactly from."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from engine import RunSettings
from handlers import fit, load_checkpoint, seed_everything
from tests.test_run import figures
from tests.test_user_data import program

BATCH = 16


class SignalsItself(Dataset):
    """Pairs from tensors; the ``at``-th sample read sends this process SIGTERM, so the signal lands
    while the loader is assembling a batch (Ignite between GET_BATCH_STARTED and GET_BATCH_COMPLETED)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, at: int | None = None) -> None:
        self.x, self.y, self.at, self.reads = x, y, at, 0

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads += 1
        if self.reads == self.at:
            os.kill(os.getpid(), signal.SIGTERM)  # Python runs the handler here, inside the fetch
        return self.x[i], self.y[i]


class FetchedFrom(torch.Tensor):
    """The in-memory path's inputs: its loader gathers the next batches with ``index_select``; the ``at``-th
    call sends this process SIGTERM, so the signal lands inside the fetch. Results are plain tensors."""

    at: int | None = None
    calls = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.index_select:
            FetchedFrom.calls += 1
            if FetchedFrom.calls == FetchedFrom.at:
                os.kill(os.getpid(), signal.SIGTERM)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def run(tmp_path, name: str, at: int | None = None, resume: str | None = None, path: str = "loader"):
    seed_everything(3)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))  # dropout: the global RNG
    # the CPU: FetchedFrom, the subclass that sends the signal, would be a plain tensor once copied to a GPU
    settings = RunSettings(output_dir=str(tmp_path / name), resume=resume, epochs=2, batch_size=BATCH, lr=1e-2,
                           log_every=0, progress=False, tensorboard=False, seed=3, data_path=path, device="cpu")
    if path == "memory":
        x, y = data(320, 1)
        FetchedFrom.at, FetchedFrom.calls = at, 0
        return fit(model, (x.as_subclass(FetchedFrom), y), data(64, 2), settings), FetchedFrom.calls
    samples = SignalsItself(*data(320, 1), at)
    return fit(model, samples, data(64, 2), settings), samples.reads


def weights(result) -> dict[str, torch.Tensor]:
    return load_checkpoint(result.last_path)["model"]


CHUNK = 4  # batches the in-memory loader gathers at once here (1 MiB of these rows would be the whole epoch)


def fetches_before(path: str, batch: int) -> int:
    """Reads before the fetch of ``batch`` (of 20 an epoch): samples one by one, or in memory one index_select
    of the inputs for every ``CHUNK`` batches (``batch`` then starts a chunk)."""
    if path == "loader":
        return (batch - 1) * BATCH
    epochs, position = divmod(batch - 1, 20)
    assert position % CHUNK == 0, "in memory, a fetch that reads is that of a chunk's first batch"
    return epochs * -(-20 // CHUNK) + position // CHUNK


@pytest.mark.parametrize("path, batch, sample", [("loader", 7, 1), ("loader", 7, BATCH), ("loader", 20 + 3, 5),
                                                 ("memory", 5, 1), ("memory", 20 + 9, 1)])  # fmt: skip
def test_a_signal_during_the_batch_fetch_stops_after_that_batch_and_resumes_exactly(tmp_path, monkeypatch, path,
                                                                                       batch, sample):
    monkeypatch.setattr("engine.data._CHUNK_BATCHES", CHUNK)
    straight, reads = run(tmp_path, "straight", path=path)
    before = reads - fetches_before(path, 2 * 20 + 1)  # what the run's checks read before its first batch
    stopped, _ = run(tmp_path, "stopped", at=before + fetches_before(path, batch) + sample, path=path)
    assert stopped.exit_code == 128 + signal.SIGTERM
    assert stopped.last_path.name == f"last_iter={batch}.pt"  # the batch being fetched was trained on, then saved
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back
    resumed, _ = run(tmp_path, "stopped", resume="auto", path=path)
    assert resumed.exit_code == 0
    assert figures(resumed.history) == figures(straight.history)
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- signals until the last line
# A real program sends itself real SIGINTs at known places: the first after iteration 6 (checkpoints every 4
# iterations: last_iter=4.pt is the newest complete one then), the next from inside the stop's own save, or as
# the summary is printed, or after fit has returned.
@pytest.mark.parametrize("again", ["save", "thrice", "summary", "after"])
def test_every_further_signal_is_answered_truly_and_the_exit_is_130(tmp_path, again):
    out = tmp_path / "r"
    first = [] if again == "after" else ["--signal-at", "6"]
    proc = program("--kind", "fast", "--save-every-iters", "4", *first, "--again-at", again, "--output-dir", str(out))
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr and "Interrupted" not in proc.stderr
    kept, saved = out / "checkpoints" / "last_iter=4.pt", out / "checkpoints" / "last_iter=6.pt"
    lines = proc.stdout.splitlines()
    if again in ("save", "thrice"):
        assert (f"Received SIGINT again: the run stops once its checkpoint is written (send it a third time to quit "
                f"at once; {kept} is kept)") in lines
    if again == "save":
        assert lines.index(f"Saved {saved} at epoch 1, iteration 6; continue with --resume auto") > \
            next(i for i, line in enumerate(lines) if line.startswith("Received SIGINT again"))  # fmt: skip
    if again == "thrice":
        assert lines[-1] == (f"Received SIGINT a third time: quitting at once; {kept} is kept (the file being "
                             f"written, if any, is left out)") and not saved.exists()
    if again == "summary":
        finishing = lines.index("Received SIGINT as the run finishes: its checkpoints are written; finishing its last "
                                "lines")
        assert lines[finishing + 1].startswith("Checkpoints: ") and lines[-1].startswith("History: ")
    if again == "after":
        assert proc.stderr.strip().splitlines() == [
            f"Received SIGINT after the run had ended: its files are complete (newest checkpoint: "
            f"{out / 'checkpoints' / 'last_iter=24.pt'}); exiting"]
        return
    load_checkpoint(saved if again != "thrice" else kept)  # complete and verified
    resumed = program("--kind", "fast", "--save-every-iters", "4", "--output-dir", str(out), "--resume", "auto")
    assert resumed.returncode == 0 and f"Resumed from {saved if again != 'thrice' else kept}" in resumed.stdout
