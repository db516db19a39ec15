"""bench: parameters, size on disk, latency and throughput (no timing assertions)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdistill.bench import benchmark_model, count_parameters, latency, size_on_disk, throughput
from kdistill.models import build_model


def test_count_parameters_all_and_trainable():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    assert count_parameters(model) == 4 * 3 + 3 + 3 * 2 + 2
    model[0].weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 3 + 3 * 2 + 2
    assert count_parameters(model) == 23


def test_size_on_disk_is_about_four_bytes_per_parameter():
    for model in (build_model("classic_student"), nn.Linear(100, 50)):
        n = count_parameters(model)
        size = size_on_disk(model)
        assert 4 * n <= size <= 4 * n + 8_000, (n, size)


def test_latency_and_throughput_are_positive():
    model = build_model("mlp", in_features=8, hidden=(4,), num_classes=3)
    model.train()
    lat = latency(model, (8,), repeats=5, warmup=1)
    assert set(lat) == {"median_ms", "p90_ms"}
    assert 0 < lat["median_ms"] <= lat["p90_ms"] < 10_000
    tp = throughput(model, (8,), batch_size=16, repeats=3, warmup=1)
    assert tp > 0 and math.isfinite(tp)
    assert model.training  # the mode is restored


def test_benchmark_model_keys():
    model = build_model("classic_student", input_size=8)
    out = benchmark_model(model, (1, 8, 8), throughput_batch=8, repeats=5)
    assert set(out) == {"parameters", "size_bytes", "latency_ms", "latency_p90_ms", "latency_batch",
                        "throughput", "throughput_batch"}
    assert out["parameters"] == count_parameters(model)
    assert out["size_bytes"] > 4 * out["parameters"]
    assert out["latency_ms"] > 0 and out["throughput"] > 0
    assert out["latency_batch"] == 1 and out["throughput_batch"] == 8


def test_parameterless_model():
    model = nn.Flatten()
    assert count_parameters(model) == 0
    assert latency(model, (2, 3), repeats=2, warmup=0)["median_ms"] > 0


def test_repeats_must_be_positive():
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        latency(nn.Linear(2, 2), (2,), repeats=0)
