"""What a model costs to deploy: parameters, size on disk, latency, throughput.

Latency and throughput are medians over repeats after warm-up, in eval mode under
``torch.inference_mode()``, with the current thread count. Each repeat is timed with
``time.perf_counter`` around one forward pass; on a GPU the device is synchronised before
and after it (``torch.cuda.synchronize``), so the time is that of the computation, not of
queueing its kernels. On the CPU nothing runs asynchronously and nothing is added.
Exported files (ONNX run by onnxruntime on the CPU, ``.pt2``, TorchScript) are measured
the same way by :func:`benchmark_onnx`, :func:`benchmark_pt2` and
:func:`benchmark_torchscript`, with PyTorch's thread count.
"""

from __future__ import annotations

import io
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from .errors import ModelInputError
from .export import export_format, load_exported, ort_session, require_extra
from .runtime import module_device


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters (all, or only those that require gradients)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def size_on_disk(model: nn.Module) -> int:
    """Bytes of the model's ``state_dict`` saved with ``torch.save``."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


def _is_cuda(device: torch.device) -> bool:
    return device.type == "cuda"


def _synchronizer(device: torch.device) -> Callable[[], None] | None:
    """What waits until ``device`` has finished the work queued on it, or ``None`` where
    work runs synchronously (the CPU)."""
    if _is_cuda(device):
        return lambda: torch.cuda.synchronize(device)
    if device.type in ("cpu", "meta"):
        return None
    backend = getattr(torch, device.type, None)  # mps, xpu, ...
    return getattr(backend, "synchronize", None)


def _timings(model: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> list[float]:
    """Seconds per forward pass of ``model`` on ``x`` (eval mode, inference mode; the mode
    is restored), each timed region bracketed by device synchronisations on a GPU."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sync = _synchronizer(x.device)
    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            for _ in range(repeats):
                if sync is not None:
                    sync()  # nothing queued before (warm-up, last repeat) is counted
                start = time.perf_counter()
                model(x)
                if sync is not None:
                    sync()  # the forward's kernels have run, not only been queued
                times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return times


def latency(
    model: nn.Module, input_shape: Sequence[int], *, batch_size: int = 1, warmup: int = 10, repeats: int = 50
) -> dict[str, float]:
    """Forward latency in milliseconds at ``batch_size``: ``{"median_ms", "p90_ms"}``.

    On the model's device (its parameters'); on a GPU each timed forward is bracketed by
    ``torch.cuda.synchronize`` (module docstring)."""
    device = module_device(model)
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
    device = module_device(model)
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


# --------------------------------------------------------------------------------------
# exported files
# --------------------------------------------------------------------------------------


def _time_calls(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Seconds per call of ``fn`` over ``repeats`` calls, after ``warmup`` untimed ones."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _bench_callable(
    run: Callable[[object], object],
    make_input: Callable[[int], object],
    *,
    latency_batch: int,
    throughput_batch: int,
    repeats: int,
) -> dict[str, float]:
    """Latency (median and p90, ms) at ``latency_batch``, throughput at ``throughput_batch``."""
    for name, value in (("latency_batch", latency_batch), ("throughput_batch", throughput_batch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    x = make_input(latency_batch)
    times = sorted(_time_calls(lambda: run(x), warmup=10, repeats=repeats))
    xb = make_input(throughput_batch)
    tp_times = _time_calls(lambda: run(xb), warmup=2, repeats=max(3, repeats // 5))
    return {
        "latency_ms": 1e3 * statistics.median(times),
        "latency_p90_ms": 1e3 * times[min(len(times) - 1, int(0.9 * len(times)))],
        "latency_batch": latency_batch,
        "throughput": throughput_batch / statistics.median(tp_times),
        "throughput_batch": throughput_batch,
    }


def _file_size(path: Path) -> int:
    if not path.is_file():
        raise FileNotFoundError(f"exported model {str(path)!r} does not exist; export one first")
    return path.stat().st_size


def count_onnx_parameters(path: str | os.PathLike) -> int:
    """Number of weights in an ONNX file, counted from its initializers.

    Counts float initializers and the quantized weights and biases of an int8 file (the
    data input of ``DequantizeLinear``, the weight of ``MatMulInteger``/``ConvInteger``),
    but not quantization scales and zero points, integer constants such as shapes, nor
    0-d float constants (a padding value, an epsilon), so a float export and its static
    int8 version count the same. (A 0-d learnable parameter would be missed.)
    """
    onnx = require_extra("onnx")
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    # quantization parameters: inputs 1 and 2 (scale, zero point) of (De)QuantizeLinear,
    # zero points of the integer ops
    qparams: set[str] = set()
    quantized: set[str] = set()
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            qparams.update(node.input[1:3])
            if node.op_type == "DequantizeLinear":
                quantized.add(node.input[0])
        elif node.op_type in ("MatMulInteger", "ConvInteger"):
            qparams.update(node.input[2:4])
            quantized.add(node.input[1])
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    total = 0
    for init in graph.initializer:
        if init.name in qparams:
            continue
        if init.name in quantized or (init.data_type in float_types and len(init.dims) > 0):
            n = 1
            for d in init.dims:
                n *= d
            total += n
    return total


def benchmark_onnx(
    path: str | os.PathLike,
    input_shape: Sequence[int],
    *,
    latency_batch: int = 1,
    throughput_batch: int = 256,
    repeats: int = 50,
) -> dict[str, float]:
    """:func:`benchmark_model` for an ONNX file, run by onnxruntime on the CPU.

    The session uses PyTorch's intra-op thread count (``torch.get_num_threads()``), so the
    numbers compare with :func:`benchmark_model`'s on the same machine.

    Args:
        path: the ``.onnx`` file.
        input_shape: the per-sample input shape, e.g. ``(1, 28, 28)``; batches are
            ``(batch, *input_shape)`` float32.
        latency_batch: batch size of the latency measurement.
        throughput_batch: batch size of the throughput measurement.
        repeats: timed latency runs (throughput: ``max(3, repeats // 5)``).

    Returns:
        ``{"parameters"`` (from the initializers, see :func:`count_onnx_parameters`),
        ``"size_bytes"`` (the file's size), ``"latency_ms"`` (median), ``"latency_p90_ms"``,
        ``"latency_batch"``, ``"throughput"`` (samples/s), ``"throughput_batch"}``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        MissingExtraError: ``onnx``/``onnxruntime`` are not installed.
        ValueError: ``repeats`` or a batch size is not positive.
    """
    path = Path(path)
    if export_format(path) != "onnx":
        raise ValueError(f"benchmark_onnx needs an .onnx file, got {str(path)!r}; use benchmark_torchscript()")
    size = _file_size(path)
    session = ort_session(path, torch.get_num_threads())
    name = session.get_inputs()[0].name
    shape = tuple(int(d) for d in input_shape)
    expected = session.get_inputs()[0].shape[1:]
    if all(isinstance(d, int) for d in expected) and tuple(expected) != shape:
        raise ModelInputError(
            f"{path.name} expects inputs of shape (B, {', '.join(map(str, expected))}), "
            f"got input_shape={shape}"
        )
    rng = np.random.default_rng(0)
    timings = _bench_callable(
        lambda feed: session.run(None, feed),
        lambda b: {name: rng.standard_normal((b, *shape), dtype=np.float32)},
        latency_batch=latency_batch,
        throughput_batch=throughput_batch,
        repeats=repeats,
    )
    return {"parameters": count_onnx_parameters(path), "size_bytes": size, **timings}


def _count_script_parameters(module: torch.jit.ScriptModule) -> int:
    """Parameters of a TorchScript module, the packed weights of dynamically quantized
    ``nn.Linear`` layers included (they are not ``parameters()``)."""
    total = sum(p.numel() for p in module.parameters())
    for sub in module.modules():
        packed = getattr(sub, "_packed_params", None)
        if isinstance(packed, torch.ScriptObject):
            try:
                weight, bias = torch.ops.quantized.linear_unpack(packed)
            except RuntimeError:  # another kind of packed parameters: not counted
                continue
            total += weight.numel() + (bias.numel() if bias is not None else 0)
    return total


def benchmark_torchscript(
    path: str | os.PathLike,
    input_shape: Sequence[int],
    *,
    latency_batch: int = 1,
    throughput_batch: int = 256,
    repeats: int = 50,
) -> dict[str, float]:
    """:func:`benchmark_model` for a TorchScript file, loaded onto the CPU.

    Args:
        path: the TorchScript file (``.pt``, ``.ts``, ...).
        input_shape: the per-sample input shape; batches are ``(batch, *input_shape)``.
        latency_batch: batch size of the latency measurement.
        throughput_batch: batch size of the throughput measurement.
        repeats: timed latency runs (throughput: ``max(3, repeats // 5)``).

    Returns:
        The keys of :func:`benchmark_model`; ``"size_bytes"`` is the file's size and
        ``"parameters"`` counts the packed weights of int8 linear layers too.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``repeats`` or a batch size is not positive.
    """
    path = Path(path)
    size = _file_size(path)
    exported = load_exported(path)
    if exported.format != "torchscript":
        raise ValueError(f"benchmark_torchscript needs a TorchScript file, got {str(path)!r}; "
                         f"use benchmark_onnx() or benchmark_pt2()")
    module = exported.backend
    shape = tuple(int(d) for d in input_shape)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x)

    timings = _bench_callable(
        run,
        lambda b: torch.randn(b, *shape),
        latency_batch=latency_batch,
        throughput_batch=throughput_batch,
        repeats=repeats,
    )
    return {"parameters": _count_script_parameters(module), "size_bytes": size, **timings}


def benchmark_pt2(
    path: str | os.PathLike,
    input_shape: Sequence[int],
    *,
    latency_batch: int = 1,
    throughput_batch: int = 256,
    repeats: int = 50,
) -> dict[str, float]:
    """:func:`benchmark_model` for a ``.pt2`` file (``torch.export``), run in PyTorch on
    the CPU.

    Args:
        path: the ``.pt2`` file (:func:`kdistill.export.export_pt2`).
        input_shape: the per-sample input shape; batches are ``(batch, *input_shape)``.
        latency_batch: batch size of the latency measurement.
        throughput_batch: batch size of the throughput measurement.
        repeats: timed latency runs (throughput: ``max(3, repeats // 5)``).

    Returns:
        The keys of :func:`benchmark_model`; ``"size_bytes"`` is the file's size and
        ``"parameters"`` counts the program's parameters (not its buffers).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not a ``.pt2`` file, or ``repeats`` or a batch size is not positive.
    """
    path = Path(path)
    if export_format(path) != "pt2":
        raise ValueError(f"benchmark_pt2 needs a .pt2 file, got {str(path)!r}; use benchmark_onnx() or "
                         f"benchmark_torchscript()")
    size = _file_size(path)
    exported = load_exported(path)
    program = exported.backend
    names = set(program.graph_signature.parameters)
    parameters = sum(v.numel() for k, v in program.state_dict.items() if k in names)
    shape = tuple(int(d) for d in input_shape)
    timings = _bench_callable(
        exported,
        lambda b: torch.randn(b, *shape),
        latency_batch=latency_batch,
        throughput_batch=throughput_batch,
        repeats=repeats,
    )
    return {"parameters": parameters, "size_bytes": size, **timings}
