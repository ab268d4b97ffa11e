"""Tests for study/bench.py: what the benchmark compares is the same function, and its bookkeeping is right.

    python -m pytest -q study/test_bench.py

Checked: the two-batched-matmul layout (fast_adapter) computes GraLoRALinear.adapter in float64, Hybrid
included; autograd keeps exactly the predicted latent per token (adapter_latent); the ratio helper reports the
median and quartiles of per-repetition ratios; interleaved runs every case the same number of times; one shape
measured end to end gives one row per section. Small, seeded, CPU, a few seconds; no timing is asserted.
"""

import types

import pytest
import torch
import torch.nn as nn

import gralora
from study import bench


@pytest.mark.parametrize("N,M,r,k,hybrid_r", [(12, 8, 4, 2, 0), (16, 24, 8, 4, 0), (12, 8, 4, 2, 2)])
def test_fast_adapter_computes_the_einsum_adapter(N, M, r, k, hybrid_r):
    torch.manual_seed(0)
    layer = gralora.GraLoRALinear(nn.Linear(N, M, dtype=torch.float64), r, k=k, hybrid_r=hybrid_r)
    bench.trained_looking(layer)
    assert all(p.abs().sum() > 0 for name, p in layer.named_parameters() if name.endswith("B"))
    x = torch.randn(3, 5, N, dtype=torch.float64)
    torch.testing.assert_close(bench.fast_adapter(layer, x), layer.adapter(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method,r,k,hybrid_r", [("LoRA", 8, 1, 0), ("GraLoRA", 8, 2, 0), ("GraLoRA", 8, 4, 0),
                                                  ("GraLoRA", 4, 2, 4)])
def test_saved_bytes_per_token_is_the_predicted_latent(method, r, k, hybrid_r):
    torch.manual_seed(0)
    base = nn.Linear(32, 48)
    layer = (gralora.LoRALinear(base, r + hybrid_r) if method == "LoRA"
             else gralora.GraLoRALinear(base, r, k=k, hybrid_r=hybrid_r))
    per_token = bench.saved_bytes_per_token(layer, 32, list(layer.parameters()), 64, torch.device("cpu"),
                                            torch.float32)
    assert per_token == 4 * gralora.adapter_latent(1, r, k, hybrid_r)  # float32: 4 bytes per value


def test_ratio_is_the_median_and_quartiles_of_per_repetition_ratios():
    times = {"a": [2.0, 3.0, 8.0, 5.0, 1.0], "b": [1.0, 1.0, 2.0, 1.0, 1.0]}  # ratios 2, 3, 4, 5, 1
    med, lo, hi = bench.ratio(times, "a", "b")
    assert med == 3.0 and lo == 1.5 and hi == 4.5  # statistics.quantiles' default (exclusive) method
    assert bench.fmt_ratio((med, lo, hi)) == "3.000 [1.50-4.50]"


def test_interleaved_runs_every_case_equally_and_keeps_the_timed_ones():
    calls = []
    cases = {name: (lambda name=name: calls.append(name)) for name in ("x", "y", "z")}
    times = bench.interleaved(cases, reps=4, warmup=2, device=torch.device("cpu"))
    assert {name: calls.count(name) for name in cases} == {"x": 6, "y": 6, "z": 6}
    assert calls[:3] == ["x", "y", "z"] and calls[3:6] == ["y", "z", "x"]  # the order rotates
    assert {name: len(t) for name, t in times.items()} == {"x": 4, "y": 4, "z": 4}


def test_measure_shape_gives_one_row_per_section():
    args = types.SimpleNamespace(tokens=64, reps=2, warmup=1, clock="wall")
    shape = ("tiny", 32, 48, 8, 2, 0)
    rows = bench.measure_shape(shape, torch.device("cpu"), torch.float32, args, use_peft=False)
    assert len(rows) == 4 and all(row.startswith("tiny") for row in rows)
    memory = rows[3].split("|")[1].split()  # LoRA, then GraLoRA: bytes per token (predicted)
    assert memory == ["32", "(", "32)", "64", "(", "64)"]  # r = 8 and k * r = 16 float32 values per token
