"""bench: parameters, size on disk, latency and throughput (no timing assertions)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdistill.bench import benchmark_model, count_parameters, latency, size_on_disk, throughput
from kdistill.models import build_model

# the TorchScript paths are deprecated upstream; these tests measure them on purpose
pytestmark = pytest.mark.filterwarnings("ignore:TorchScript.*deprecated in PyTorch:DeprecationWarning")


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


# ---------------------------------------------------------------------------------- exported files

import importlib.util  # noqa: E402

from kdistill.errors import ModelInputError  # noqa: E402

needs_onnx = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime")),
    reason='needs the export extra: pip install "kdistill[export]"',
)
BENCH_KEYS = {"parameters", "size_bytes", "latency_ms", "latency_p90_ms", "latency_batch",
              "throughput", "throughput_batch"}


@needs_onnx
def test_benchmark_onnx_float_and_int8(tmp_path):
    from kdistill.bench import benchmark_onnx, count_onnx_parameters
    from kdistill.export import export_onnx, quantize_int8

    torch.manual_seed(0)
    model = build_model("classic_student", input_size=8)
    x = torch.randn(64, 1, 8, 8)
    path = export_onnx(model, x[:2], tmp_path / "m.onnx", dynamo=False)
    out = benchmark_onnx(path, (1, 8, 8), throughput_batch=8, repeats=5)
    assert set(out) == BENCH_KEYS
    assert out["size_bytes"] == path.stat().st_size
    assert out["parameters"] == count_parameters(model)
    assert 0 < out["latency_ms"] <= out["latency_p90_ms"] and math.isfinite(out["latency_p90_ms"])
    assert out["throughput"] > 0 and math.isfinite(out["throughput"])
    assert out["latency_batch"] == 1 and out["throughput_batch"] == 8
    q = quantize_int8(path, calibration=x)  # int8 weights count as parameters, scales do not
    assert count_onnx_parameters(q) == count_parameters(model)
    out_q = benchmark_onnx(q, (1, 8, 8), throughput_batch=8, repeats=3)
    assert out_q["size_bytes"] == q.stat().st_size < out["size_bytes"]


@needs_onnx
def test_benchmark_onnx_errors(tmp_path):
    from kdistill.bench import benchmark_onnx
    from kdistill.export import export_onnx

    model = build_model("mlp", in_features=8, hidden=(4,), num_classes=3)
    path = export_onnx(model, torch.randn(2, 8), tmp_path / "m.onnx", dynamo=False)
    with pytest.raises(ModelInputError, match=r"m\.onnx expects inputs of shape \(B, 8\), got input_shape=\(9,\)"):
        benchmark_onnx(path, (9,), repeats=1)
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        benchmark_onnx(path, (8,), repeats=0)
    with pytest.raises(ValueError, match="throughput_batch must be a positive int, got 0"):
        benchmark_onnx(path, (8,), throughput_batch=0, repeats=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        benchmark_onnx(tmp_path / "missing.onnx", (8,))
    with pytest.raises(ValueError, match="use benchmark_torchscript"):
        benchmark_onnx(tmp_path / "m.pt", (8,))


def test_benchmark_torchscript_float_and_int8(tmp_path):
    from kdistill.bench import benchmark_torchscript
    from kdistill.export import export_torchscript, quantize_int8

    model = build_model("mlp", in_features=8, hidden=(32,), num_classes=3)
    x = torch.randn(4, 8)
    path = export_torchscript(model, x, tmp_path / "m.pt")
    out = benchmark_torchscript(path, (8,), throughput_batch=8, repeats=5)
    assert set(out) == BENCH_KEYS
    assert out["size_bytes"] == path.stat().st_size
    assert out["parameters"] == count_parameters(model)
    assert 0 < out["latency_ms"] <= out["latency_p90_ms"] and out["throughput"] > 0
    q = quantize_int8(model, tmp_path / "m.int8.pt", example_input=x)  # packed int8 weights are counted
    assert benchmark_torchscript(q, (8,), throughput_batch=8, repeats=2)["parameters"] == count_parameters(model)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        benchmark_torchscript(tmp_path / "missing.pt", (8,))


def test_gpu_timings_synchronize_around_each_timed_forward(monkeypatch):
    import kdistill.bench as bench

    calls = []
    monkeypatch.setattr(bench, "_is_cuda", lambda device: True)  # as if the model were on a GPU
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    model = build_model("mlp", in_features=8, hidden=(4,), num_classes=3)
    lat = latency(model, (8,), repeats=5, warmup=2)
    assert len(calls) == 2 * 5 and lat["median_ms"] > 0  # before and after each of the 5 timed forwards
    calls.clear()
    assert throughput(model, (8,), batch_size=4, repeats=3, warmup=1) > 0
    assert len(calls) == 2 * 3


def test_the_synchronizer_follows_the_device_type(monkeypatch):
    from kdistill.bench import _synchronizer

    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    assert _synchronizer(torch.device("cpu")) is None  # nothing asynchronous on the CPU
    _synchronizer(torch.device("cuda", 1))()
    assert calls == [torch.device("cuda", 1)]


def test_benchmark_pt2(tmp_path):
    from kdistill.bench import benchmark_pt2, benchmark_torchscript
    from kdistill.export import export_pt2

    model = build_model("mlp", in_features=8, hidden=(32,), num_classes=3)
    path = export_pt2(model, torch.randn(4, 8), tmp_path / "m.pt2")
    out = benchmark_pt2(path, (8,), throughput_batch=8, repeats=5)
    assert set(out) == BENCH_KEYS
    assert out["size_bytes"] == path.stat().st_size and out["parameters"] == count_parameters(model)
    assert 0 < out["latency_ms"] <= out["latency_p90_ms"] and out["throughput"] > 0
    with pytest.raises(ValueError, match="use benchmark_onnx"):
        benchmark_pt2(tmp_path / "m.pt", (8,))
    with pytest.raises(ValueError, match=r"benchmark_pt2\(\)"):
        benchmark_torchscript(path, (8,))
