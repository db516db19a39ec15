"""What a model costs to deploy: parameters, size on disk, latency, throughput.

Latency and throughput are medians over repeats after warm-up, in eval mode under
``torch.inference_mode()``, with the current thread count.
"""

from __future__ import annotations

import io
import statistics
import time
from typing import Sequence

import torch
from torch import nn


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those that require gradients)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def size_on_disk(model: nn.Module) -> int:
    """Bytes of the model's ``state_dict`` saved with ``torch.save``."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def _model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (the CPU if it has neither)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


def _timings(model: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> list[float]:
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    was_training = model.training
    model.eval()
    times = []
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    model.train(was_training)
    return times


def latency(
    model: nn.Module, input_shape: Sequence[int], *, batch_size: int = 1, warmup: int = 10, repeats: int = 50
) -> dict[str, float]:
    """Forward latency in milliseconds at ``batch_size``: ``{"median_ms", "p90_ms"}``."""
    device = _model_device(model)
    x = torch.randn(batch_size, *input_shape, device=device)
    times = sorted(_timings(model, x, warmup, repeats))
    return {
        "median_ms": 1e3 * statistics.median(times),
        "p90_ms": 1e3 * times[min(len(times) - 1, int(0.9 * len(times)))],
    }


def throughput(
    model: nn.Module, input_shape: Sequence[int], *, batch_size: int = 256, warmup: int = 2, repeats: int = 10
) -> float:
    """Samples per second of the forward pass at ``batch_size`` (median over repeats)."""
    device = _model_device(model)
    x = torch.randn(batch_size, *input_shape, device=device)
    return batch_size / statistics.median(_timings(model, x, warmup, repeats))


def benchmark_model(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    latency_batch: int = 1,
    throughput_batch: int = 256,
    repeats: int = 50,
) -> dict[str, float]:
    """All of the above in one dict (the rows of a report's comparison table)."""
    lat = latency(model, input_shape, batch_size=latency_batch, repeats=repeats)
    return {
        "parameters": count_parameters(model),
        "size_bytes": size_on_disk(model),
        "latency_ms": lat["median_ms"],
        "latency_p90_ms": lat["p90_ms"],
        "latency_batch": latency_batch,
        "throughput": throughput(model, input_shape, batch_size=throughput_batch, repeats=max(3, repeats // 5)),
        "throughput_batch": throughput_batch,
    }
