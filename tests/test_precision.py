"""Precision by hardware: amp="auto" picks bf16 only where it is native; an emulated one warns once."""

from __future__ import annotations

import pytest
import torch

import engine.amp as amp_module
from engine.amp import native_precisions, resolve_amp

AVX2_ONLY = ("AMD EPYC 7B13", {"avx", "avx2", "fma"})
AVX512_BF16 = ("AMD EPYC 9B45", {"avx2", "avx512f", "avx512_bf16"})
AMX = ("Intel Xeon Platinum 8480+", {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "avx512_fp16"})


@pytest.mark.parametrize(
    "cpu, auto, natives",
    [(AVX2_ONLY, None, {}), (AVX512_BF16, "bf16", {"bf16": "avx512_bf16"}),
     (AMX, "bf16", {"bf16": "amx_bf16", "fp16": "avx512_fp16"}), (("", set()), None, {})],
)
def test_auto_picks_bf16_only_where_it_is_native(monkeypatch, cpu, auto, natives):
    monkeypatch.setattr(amp_module, "cpu_flags", lambda: cpu)
    cpu_device = torch.device("cpu")
    lines: list[str] = []
    assert native_precisions(cpu_device) == natives
    assert resolve_amp("auto", cpu_device, log=lines.append) == auto and lines == []
    assert resolve_amp(None, cpu_device, log=lines.append) is None and lines == []


@pytest.mark.parametrize("requested", ["bf16", "fp16"])
def test_an_emulated_precision_runs_after_one_warning_line(monkeypatch, requested):
    monkeypatch.setattr(amp_module, "cpu_flags", lambda: AVX2_ONLY)
    lines: list[str] = []
    assert resolve_amp(requested, torch.device("cpu"), log=lines.append) == requested
    assert len(lines) == 1 and "likely be slower than full precision on AMD EPYC 7B13" in lines[0]
    assert f"no AVX512-{requested.upper()}" in lines[0]


def test_a_native_precision_runs_without_a_word(monkeypatch):
    monkeypatch.setattr(amp_module, "cpu_flags", lambda: AMX)
    lines: list[str] = []
    assert resolve_amp("bf16", torch.device("cpu"), log=lines.append) == "bf16" and lines == []


def test_this_machines_flags_are_read():
    model, flags = amp_module.cpu_flags()
    assert isinstance(model, str) and isinstance(flags, set)


def test_timing_the_precisions_leaves_the_model_its_statistics_and_the_generators_as_they_were():
    import torch
    from torch import nn

    from engine.amp import measure_precisions

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5),
                          nn.Linear(8 * 6 * 6, 4)).eval()  # fmt: skip
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    timings = measure_precisions(model, x, y, nn.CrossEntropyLoss(), torch.device("cpu"), (None, "bf16"),
                                 lambda m, inputs: m(inputs), rounds=3, warmup=1)
    assert set(timings) == {"fp32", "bf16"} and all(ms > 0 for ms in timings.values())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm's running statistics
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)  # dropout's draws put back
