"""``--compile``: one graph for the batch size trained with, the short batches and the first evaluation eager,
the compiler's per-process costs started early, and a real Inductor compile of a run on the CPU."""

import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from engine.compiled import CompiledModel, leading_size
from engine.trainer import _innermost
from handlers.compiler import ARTIFACTS, CompiledArtifacts, warm_compiler


class Graphs:
    """A ``torch.compile`` backend that counts the graphs Dynamo hands it and runs them as they are."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.count += 1
        return gm.forward


@pytest.fixture
def compiled():
    torch._dynamo.reset()
    torch.manual_seed(0)
    graphs = Graphs()
    model = CompiledModel(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)), backend=graphs)
    yield model, graphs
    torch._dynamo.reset()


def test_training_compiles_one_graph_and_runs_other_batch_sizes_eagerly(compiled):
    model, graphs = compiled
    for size in (8, 8, 5, 8, 1):
        x = torch.randn(size, 4)
        out = model(x)
        assert torch.equal(out, model.eager(x))  # the same parameters, the same result either way
        out.sum().backward()
    assert graphs.count == 1


def test_the_first_evaluation_pass_is_eager_the_second_compiled(compiled):
    model, graphs = compiled
    model(torch.randn(8, 4))
    assert graphs.count == 1
    with torch.no_grad():
        model.eval()
        for _ in range(3):
            model(torch.randn(16, 4))
        assert graphs.count == 1 and model.eval_passes == 1
        model.train()
        model.eval()
        model.eval()  # already evaluating: the same pass
        model(torch.randn(16, 4))
        model(torch.randn(7, 4))  # its short last batch: eager
    assert graphs.count == 2 and model.eval_passes == 2


def test_the_trainer_finds_the_users_module_inside(compiled):
    model, _ = compiled
    assert _innermost(model) is model.eager and isinstance(model.eager, nn.Sequential)
    assert [p for p in model.parameters()] == [p for p in model.eager.parameters()]


@pytest.mark.parametrize("args, kwargs, size", [
    ((torch.zeros(5, 2),), {}, 5),
    ((), {"input_ids": torch.zeros(3, 7)}, 3),
    (({"a": torch.zeros(4, 1)},), {}, 4),
    (([torch.zeros(6), torch.zeros(2)],), {}, 6),
    ((torch.zeros(()),), {}, None),
    (("text", 3), {}, None),
])  # fmt: skip
def test_leading_size(args, kwargs, size):
    assert leading_size(args, kwargs) == size


_SYSTEM_KEY = """
import sys
import torch
from handlers.adapters import skip_unused_triton_key
if sys.argv[1] == "skip":
    assert skip_unused_triton_key()
from torch._inductor.codecache import CacheBase
print(CacheBase.get_system()["hash"])
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA Triton's key is part of Inductor's, and kept")
def test_skipping_tritons_key_leaves_inductors_system_key_as_it_was():
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    keys = [subprocess.run([sys.executable, "-c", _SYSTEM_KEY, how], capture_output=True, text=True, env=env,
                           check=True).stdout.strip() for how in ("as-is", "skip")]  # fmt: skip
    assert keys[0] and keys[0] == keys[1]


def test_warm_compiler_imports_inductor_and_hashes_torch_in_a_thread(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    thread = warm_compiler()
    assert warm_compiler() is thread  # once a process: the front door and the launcher both ask
    thread.join(timeout=120)
    assert not thread.is_alive() and "torch._inductor.compile_fx" in sys.modules
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "ignite-trainer" / "compile")


@pytest.mark.slow
def test_a_compiled_run_traces_one_graph_and_its_folder_carries_it_to_an_empty_cache(tmp_path, monkeypatch):
    """Inductor for real (a cold cache: ~6 s): an epoch of 6 full batches and a short one, one validation; one
    graph, the short batch and the validation eager; the run's compiled work written beside its checkpoints.
    Then the run resumed for a second epoch with another, empty cache: its graph comes from the run's file."""
    from torch._dynamo.utils import counters

    from engine import RunSettings
    from handlers import fit, seed_everything

    def run(cache: str, **options) -> object:
        monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / cache))
        torch._dynamo.reset()
        counters.clear()
        seed_everything(0)
        settings = RunSettings(output_dir=str(tmp_path / "run"), batch_size=32, compile=True, progress=False,
                               **options)
        return fit(model, (x, y), (x[:50], y[:50]), settings)

    x = torch.randn(200, 8)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    before = [p.detach().clone() for p in model.parameters()]
    try:
        first = run("first", epochs=1)
        assert first.exit_code == 0 and math.isfinite(first.history[-1]["val_loss"])
        assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it trained
        assert counters["stats"]["unique_graphs"] == 1 and counters["frames"]["ok"] == 1
        assert any((tmp_path / "first").iterdir()) and (tmp_path / "run" / ARTIFACTS).stat().st_size > 0
        second = run("second", epochs=2, resume="auto")
        assert second.exit_code == 0 and [row["epoch"] for row in second.history] == [1, 2]
        aot, inductor = counters["aot_autograd"], counters["inductor"]  # the file's, the cache being empty
        assert aot["autograd_cache_hit"] == 1 and not aot["autograd_cache_miss"]
        assert inductor["fxgraph_cache_hit"] >= 1 and not inductor["fxgraph_cache_miss"]
    finally:
        torch._dynamo.reset()


def test_a_damaged_artifacts_file_is_one_line_and_the_run_compiles_afresh(tmp_path, capsys):
    path = tmp_path / ARTIFACTS
    path.write_bytes(b"not what torch.compiler.save_cache_artifacts wrote")
    assert CompiledArtifacts.load(path) is False
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"warning: {path} could not be loaded") and "compiling afresh" in out[0]


def test_nothing_compiled_since_the_start_writes_no_artifacts_file(tmp_path):
    artifacts = CompiledArtifacts()
    artifacts.start(tmp_path / ARTIFACTS)  # what this process compiled before (other tests) is not this run's
    artifacts.save()
    assert not (tmp_path / ARTIFACTS).exists()
