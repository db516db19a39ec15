"""Export a trained model for deployment: ONNX, ``torch.export`` (.pt2), int8; and check
the export.

The path from a trained student to a file a server can run::

    export_onnx(student, x_test[:2], "student.onnx")             # float ONNX
    check_parity(student, "student.onnx", x_test[:512])          # same logits? else raise
    quantize_int8("student.onnx", "student.int8.onnx",
                  calibration=x_train[:512])                     # static int8 (QDQ)
    evaluate_exported("student.int8.onnx", x_test, y_test)       # accuracy after int8

Every exported file has one input ``"input"`` of shape ``(B, *input_shape)`` (``B`` free:
a dynamic batch axis) and one output ``"logits"`` of shape ``(B, C)``. Files are written
atomically (temp file in the same folder, then renamed): a crash leaves the old file or the
new one, never half of one.

ONNX export uses ``torch.onnx.export(..., dynamo=True)`` (the exporter built on
``torch.export``, the default since PyTorch 2.9; it needs ``onnxscript``) and falls back to
the older TorchScript-based exporter if that fails. :func:`export_pt2` writes PyTorch's
own deployment format: ``torch.export.export`` then ``torch.export.save`` (a ``.pt2``
file that ``torch.export.load`` reads, for AOTInductor or ExecuTorch; no extra needed).

**Deprecated upstream:** :func:`export_torchscript` (``torch.jit.trace``) and TorchScript
int8 (:func:`quantize_int8` to a ``.pt`` file: ``torch.ao.quantization.quantize_dynamic``)
use APIs PyTorch deprecates; they are kept for deployments that load models with libtorch,
and issue a ``DeprecationWarning`` when called. Prefer ``.pt2`` or ONNX (and ONNX int8).

``onnx``, ``onnxruntime`` and ``onnxscript`` are optional (``pip install
"kdistill[export]"``) and imported only inside the functions that need them, so
``import kdistill`` stays light.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import os
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from .atomic import atomic_write, replace_durably, temp_path_beside
from .errors import ExportParityError, KDistillError, MissingExtraError, ModelInputError
from .runtime import module_device

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
ONNX_SUFFIXES = (".onnx",)
TORCHSCRIPT_SUFFIXES = (".pt", ".ts", ".pth", ".torchscript")
PT2_SUFFIXES = (".pt2",)
# the per-sample input shape, stored inside TorchScript and .pt2 files (ONNX files carry it in the graph)
_TS_META = "kdistill_input_shape"


# --------------------------------------------------------------------------------------
# optional dependencies
# --------------------------------------------------------------------------------------


def require_extra(module: str, extra: str = "export") -> ModuleType:
    """Import an optional dependency, or say which extra installs it.

    Args:
        module: the module to import (``"onnx"``, ``"onnxruntime"``, ...).
        extra: the ``kdistill`` extra that installs it.

    Returns:
        The imported module.

    Raises:
        MissingExtraError: (an ``ImportError``) when the module cannot be imported; the
            message names the module and the ``pip install "kdistill[<extra>]"`` command.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"{module!r} is needed for this but could not be imported ({e}). "
            f'Install the optional dependencies with: pip install "kdistill[{extra}]"'
        ) from e


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def export_format(path: str | os.PathLike) -> str:
    """The format of an exported file, from its suffix.

    Args:
        path: the file (it need not exist).

    Returns:
        ``"onnx"`` for ``.onnx``; ``"pt2"`` for ``.pt2`` (``torch.export``);
        ``"torchscript"`` for ``.pt``, ``.ts``, ``.pth``, ``.torchscript``.

    Raises:
        ValueError: for any other suffix (the message lists the known ones).
    """
    suffix = Path(path).suffix.lower()
    if suffix in ONNX_SUFFIXES:
        return "onnx"
    if suffix in PT2_SUFFIXES:
        return "pt2"
    if suffix in TORCHSCRIPT_SUFFIXES:
        return "torchscript"
    raise ValueError(
        f"unknown export format for {str(path)!r}: expected a file ending in "
        f"{', '.join(ONNX_SUFFIXES + PT2_SUFFIXES + TORCHSCRIPT_SUFFIXES)} (.onnx for ONNX, .pt2 for "
        f"torch.export, the others for TorchScript)"
    )


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"exported model {str(path)!r} {what}; export one first with export_onnx() or export_pt2()"
        )
    return path


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    """A float32 CPU tensor from a tensor or array; anything else is a clear error."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.ndim < 2:
        raise ModelInputError(
            f"{name} must have a batch axis first, shape (B, *input_shape), got shape {tuple(x.shape)}; "
            f"for one sample use x[None]"
        )
    if x.shape[0] == 0:
        raise ModelInputError(f"{name} is empty (shape {tuple(x.shape)}); give at least one sample")
    if not x.is_floating_point():
        x = x.float()
    return x.detach().to("cpu", torch.float32)


def _cpu_eval_copy(model: nn.Module) -> nn.Module:
    """The model in eval mode on the CPU; a copy, so the caller's model keeps its mode and device."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return copy.deepcopy(model).cpu().eval()


def _example_batch(model: nn.Module, example_input: Any) -> torch.Tensor:
    """Check ``example_input`` against the model; return a batch of two of it.

    Two samples, not one: exporters specialise an axis of size 1, and the batch axis must
    stay free.
    """
    x = _as_tensor(example_input, "example_input")
    expected = getattr(model, "input_shape", None)
    if expected is not None and tuple(x.shape[1:]) != tuple(expected):
        raise ModelInputError(
            f"example_input has per-sample shape {tuple(x.shape[1:])} (full shape {tuple(x.shape)}), "
            f"but the model expects {tuple(expected)}; give a batch of shape (B, {', '.join(map(str, expected))})"
        )
    x = x[:2] if x.shape[0] >= 2 else torch.cat([x, x])  # (2, *input_shape)
    with torch.inference_mode():
        try:
            out = model(x)
        except Exception as e:  # the model's own error, re-raised with the shape it was given
            raise ModelInputError(f"the model rejected example_input of shape {tuple(x.shape)}: {e}") from e
    if not isinstance(out, torch.Tensor):
        raise ModelInputError(
            f"the model must return a logits tensor to be exported, got {type(out).__name__}; "
            f"wrap it in a module whose forward returns the logits"
        )
    return x


def _temp_beside(path: Path) -> contextlib.AbstractContextManager[Path]:
    """A temporary file beside ``path`` (:func:`~kdistill.atomic.temp_path_beside`) that keeps
    its extension (``.tmp.onnx``: exporters and onnxruntime look at it); ONNX external data
    written beside it (``.data``) is removed with it."""
    return temp_path_beside(path, suffix=f".tmp{path.suffix}", companions=(".data",))


@contextlib.contextmanager
def _quiet_torch_export() -> Iterator[None]:
    """Silence known, harmless noise of the exporters (deprecations of their internals,
    optional torchvision ops that are not installed)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx._internal.exporter._registration", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=r".*feature will be removed.*")
        warnings.filterwarnings("ignore", message=r".*Constant folding.*")
        warnings.filterwarnings("ignore", message=r".*torch\.jit\..* is deprecated.*", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


# --------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------


def _onnx_export(model: nn.Module, x: torch.Tensor, path: Path, opset: int | None, dynamo: bool) -> None:
    kwargs: dict[str, Any] = dict(
        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset, verbose=False, dynamo=dynamo
    )
    if dynamo:
        # one file, weights inside (external data is only needed above 2 GB)
        kwargs.update(external_data=False, dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    else:
        kwargs.update(dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    with _quiet_torch_export():
        torch.onnx.export(model, (x,), str(path), **kwargs)


def export_onnx(
    model: nn.Module,
    example_input: Any,
    path: str | os.PathLike,
    *,
    opset: int | None = None,
    dynamo: bool | None = None,
) -> Path:
    """Export a model to ONNX with a dynamic batch axis, atomically, and validate the file.

    The model is exported in eval mode from a CPU copy (the caller's model keeps its mode
    and device). The file has input ``"input"``, shape ``(B, *input_shape)``, and output
    ``"logits"``, shape ``(B, C)``, with ``B`` free.

    Args:
        model: maps ``(B, *input_shape)`` to ``(B, C)`` logits.
        example_input: a batch ``(B, *input_shape)`` (tensor or numpy array, ``B >= 1``):
            fixes every axis but the batch axis. If the model has an ``input_shape``
            attribute (kdistill's models do), the example must match it.
        path: the ``.onnx`` file to write; its folder is created if missing.
        opset: the ONNX opset to target; ``None`` for the exporter's default (18 or more
            with the dynamo exporter).
        dynamo: ``True`` for the ``torch.export``-based exporter (needs ``onnxscript``),
            ``False`` for the TorchScript-based one (deprecated upstream), ``None`` (the
            default) for dynamo when ``onnxscript`` is installed, falling back to the
            TorchScript-based exporter, with a warning, if it fails.

    Returns:
        The path written.

    Raises:
        MissingExtraError: ``onnx`` (or ``onnxscript`` with ``dynamo=True``) is not installed.
        ModelInputError: ``example_input`` has no batch axis, does not match the model's
            ``input_shape``, or the model rejects it.
        ValueError: ``path`` does not end in ``.onnx``.
        KDistillError: the exporter wrote a file that ``onnx.checker`` rejects.
    """
    path = Path(path)
    fmt = export_format(path)
    if fmt != "onnx":
        other = "export_pt2() for .pt2" if fmt == "pt2" else "export_torchscript() for TorchScript"
        raise ValueError(f"export_onnx writes .onnx files, got {str(path)!r}; use {other}")
    if opset is not None and (not isinstance(opset, int) or opset < 7):
        raise ValueError(f"opset must be an int >= 7 (or None for the exporter's default), got {opset!r}")
    onnx = require_extra("onnx")
    if dynamo:
        require_extra("onnxscript")
    elif dynamo is None:
        try:
            require_extra("onnxscript")
        except MissingExtraError:
            dynamo = False
    model = _cpu_eval_copy(model)
    x = _example_batch(model, example_input)  # (2, *input_shape)
    with _temp_beside(path) as tmp:
        # 1. export (dynamo first, the TorchScript-based exporter as the fallback)
        if dynamo is None:
            try:
                _onnx_export(model, x, tmp, opset, dynamo=True)
            except Exception as e:  # any exporter failure: try the other exporter
                first_line = str(e).splitlines()[0] if str(e) else ""
                warnings.warn(
                    f"the dynamo ONNX exporter failed ({type(e).__name__}: {first_line}); "
                    f"falling back to the TorchScript-based exporter",
                    RuntimeWarning,
                    stacklevel=2,
                )
                _onnx_export(model, x, tmp, opset, dynamo=False)
        else:
            _onnx_export(model, x, tmp, opset, dynamo=bool(dynamo))
        # 2. validate the file before it replaces anything
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as e:
            raise KDistillError(f"the ONNX file exported for {str(path)!r} is not valid ONNX: {e}") from e
        # 3. rename into place
        return replace_durably(tmp, path)


def export_pt2(model: nn.Module, example_input: Any, path: str | os.PathLike) -> Path:
    """Export a model with ``torch.export`` (eval mode, CPU) to a ``.pt2`` file, atomically.

    ``torch.export.export`` captures the whole forward as one graph, with a dynamic batch
    axis (``B >= 1``); ``torch.export.save`` writes it with the weights. Load it with
    :func:`load_exported` (or ``torch.export.load(path).module()``) and check it with
    :func:`check_parity`. The per-sample input shape is stored in the file.

    Args:
        model: maps ``(B, *input_shape)`` to ``(B, C)`` logits.
        example_input: a batch ``(B, *input_shape)`` (tensor or numpy array): fixes every
            axis but the batch axis.
        path: the ``.pt2`` file to write; its folder is created if missing.

    Returns:
        The path written.

    Raises:
        ModelInputError: ``example_input`` has no batch axis, does not match the model's
            ``input_shape``, or the model rejects it.
        ValueError: ``path`` does not end in ``.pt2``.
        KDistillError: ``torch.export`` cannot capture the model with a free batch axis
            (data-dependent control flow, a batch size fixed inside ``forward``).
    """
    path = Path(path)
    if export_format(path) != "pt2":
        raise ValueError(f"export_pt2 writes .pt2 files, got {str(path)!r}; use export_onnx() for ONNX")
    model = _cpu_eval_copy(model)
    x = _example_batch(model, example_input)  # (2, *input_shape)
    # 1. capture the graph, the batch axis left free
    try:
        program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise KDistillError(
            f"torch.export could not export the model for {str(path)!r} with a free batch axis "
            f"({type(e).__name__}: {first_line}). Data-dependent control flow in forward, or a batch size "
            f"fixed inside it, prevents that; export_onnx(..., dynamo=False) traces instead"
        ) from e
    # 2. write it, with the per-sample input shape
    extra = {_TS_META: ",".join(map(str, x.shape[1:]))}
    return atomic_write(path, lambda f: torch.export.save(program, f, extra_files=extra))


def export_torchscript(model: nn.Module, example_input: Any, path: str | os.PathLike) -> Path:
    """Trace a model to TorchScript (eval mode, CPU) and save it atomically.

    .. deprecated::
        ``torch.jit.trace`` and ``torch.jit.save`` are deprecated upstream; this issues a
        ``DeprecationWarning``. Use :func:`export_pt2` (``torch.export``) or
        :func:`export_onnx`. Kept for deployments that load TorchScript with libtorch.

    ``torch.jit.trace`` records the operations run on ``example_input``: data-dependent
    control flow in ``forward`` is frozen to the branch taken. The per-sample input shape
    is stored in the file, so :func:`load_exported` can check inputs.

    Args:
        model: maps ``(B, *input_shape)`` to ``(B, C)`` logits.
        example_input: a batch ``(B, *input_shape)`` (tensor or numpy array).
        path: the file to write (``.pt``, ``.ts``, ``.pth`` or ``.torchscript``).

    Returns:
        The path written.

    Raises:
        ModelInputError: ``example_input`` has no batch axis, does not match the model's
            ``input_shape``, or the model rejects it.
        ValueError: ``path`` has another suffix.
    """
    path = Path(path)
    if export_format(path) != "torchscript":
        raise ValueError(f"export_torchscript writes .pt/.ts files, got {str(path)!r}; use export_onnx() for ONNX "
                         f"or export_pt2() for .pt2")
    warnings.warn(_TORCHSCRIPT_DEPRECATED, DeprecationWarning, stacklevel=2)
    model = _cpu_eval_copy(model)
    x = _example_batch(model, example_input)  # (2, *input_shape)
    return _save_torchscript(model, x, path)


_TORCHSCRIPT_DEPRECATED = (
    "TorchScript export (torch.jit.trace) is deprecated in PyTorch; export with kdistill.export.export_pt2 "
    "(torch.export, a .pt2 file) or export_onnx instead")
_AO_DEPRECATED = (
    "TorchScript int8 (torch.ao.quantization.quantize_dynamic, then torch.jit.trace) is deprecated in PyTorch; "
    "quantize to ONNX instead: quantize_int8(model, 'model.int8.onnx', calibration=...)")


def _save_torchscript(model: nn.Module, x: torch.Tensor, path: Path) -> Path:
    with _quiet_torch_export(), torch.no_grad():
        traced = torch.jit.trace(model, x)
        extra = {_TS_META: ",".join(map(str, x.shape[1:]))}
        return atomic_write(path, lambda f: torch.jit.save(traced, f, _extra_files=extra))


# --------------------------------------------------------------------------------------
# load and run
# --------------------------------------------------------------------------------------


def ort_session(path: str | os.PathLike, num_threads: int | None = None):
    """An onnxruntime session that runs an ONNX file on the CPU.

    Args:
        path: the ``.onnx`` file.
        num_threads: intra-op threads (default: PyTorch's thread count); one inter-op thread.

    Returns:
        The ``onnxruntime.InferenceSession``.

    Raises:
        MissingExtraError: ``onnxruntime`` is not installed.
        KDistillError: onnxruntime cannot load the file (corrupt, or not ONNX).
    """
    ort = require_extra("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise KDistillError(f"onnxruntime cannot load {str(path)!r} (corrupt or not an ONNX model?): {e}") from e


class ExportedModel:
    """A loaded ONNX, ``.pt2`` or TorchScript file, called like the model:
    ``(B, *input_shape) -> (B, C)``.

    Attributes:
        path: the file.
        format: ``"onnx"``, ``"pt2"`` or ``"torchscript"``.
        input_shape: the per-sample input shape the file expects (``None`` if unknown).
        backend: what runs it: the ``onnxruntime.InferenceSession``, the
            ``torch.export.ExportedProgram`` or the ``torch.jit.ScriptModule``.
    """

    def __init__(self, path: Path, fmt: str, run: Callable[[torch.Tensor], torch.Tensor], input_shape, backend):
        self.path = path
        self.format = fmt
        self.input_shape = input_shape
        self.backend = backend
        self._run = run

    def __call__(self, x: Any) -> torch.Tensor:
        """Logits ``(B, C)`` (float32, CPU) for a batch ``(B, *input_shape)`` (tensor or array)."""
        x = _as_tensor(x, "inputs")
        if self.input_shape is not None and tuple(x.shape[1:]) != tuple(self.input_shape):
            raise ModelInputError(
                f"{self.path.name} expects inputs of shape (B, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(x.shape)}"
            )
        return self._run(x)

    def __repr__(self) -> str:
        return f"ExportedModel({str(self.path)!r}, format={self.format!r}, input_shape={self.input_shape})"


def load_exported(path: str | os.PathLike, *, num_threads: int | None = None) -> ExportedModel:
    """Load an exported model to run on the CPU.

    Args:
        path: a ``.onnx`` file (run with an onnxruntime CPU session), a ``.pt2`` file
            (``torch.export.load``, run in PyTorch) or a TorchScript file (``.pt``,
            ``.ts``, ``.pth``, ``.torchscript``; loaded onto the CPU).
        num_threads: onnxruntime's intra-op threads; ``None`` for PyTorch's thread count.

    Returns:
        A callable ``f(batch) -> logits``: ``batch`` is a tensor or numpy array of shape
        ``(B, *input_shape)``, the logits a float32 CPU tensor ``(B, C)``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the suffix is none of ONNX, ``.pt2`` and TorchScript.
        MissingExtraError: ``onnxruntime`` is needed for ``.onnx`` and not installed.
        KDistillError: the file cannot be loaded (corrupt, or not a model).
    """
    fmt = export_format(path)
    path = _existing_file(path)
    if fmt == "onnx":
        session = ort_session(path, num_threads)
        inp = session.get_inputs()[0]
        dims = inp.shape[1:]
        input_shape = tuple(dims) if all(isinstance(d, int) for d in dims) else None

        def run(x: torch.Tensor) -> torch.Tensor:
            out = session.run(None, {inp.name: x.numpy()})[0]
            return torch.from_numpy(np.asarray(out, dtype=np.float32))

        return ExportedModel(path, fmt, run, input_shape, session)

    if fmt == "pt2":
        extra = {_TS_META: ""}
        try:
            program = torch.export.load(str(path), extra_files=extra)
        except Exception as e:
            raise KDistillError(f"cannot load {str(path)!r} with torch.export.load (corrupt, or not a .pt2 "
                                f"file?): {e}") from e
        graph = program.module()

        def run_pt2(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return graph(x).float()

        return ExportedModel(path, fmt, run_pt2, _shape_meta(extra[_TS_META]), program)

    extra = {_TS_META: ""}
    try:
        with _quiet_torch_export():
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as e:
        raise KDistillError(
            f"cannot load {str(path)!r} as TorchScript (corrupt, or not a TorchScript file?): {e}"
        ) from e
    module.eval()
    input_shape = _shape_meta(extra[_TS_META])

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return module(x).float()

    return ExportedModel(path, fmt, run, input_shape, module)


def _shape_meta(meta: str | bytes) -> tuple[int, ...] | None:
    """The per-sample input shape stored in a TorchScript or .pt2 file ("1,8,8")."""
    meta = meta.decode() if isinstance(meta, bytes) else meta
    return tuple(int(d) for d in meta.split(",")) if meta else None


def _batched(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``f`` over ``x`` in batches of ``batch_size``, outputs concatenated: ``(N, C)``."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return torch.cat([f(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def _torch_logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The PyTorch model's logits ``(N, C)`` on the CPU, in eval mode (its mode is restored)."""
    device = module_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return _batched(lambda b: model(b.to(device)).float().cpu(), x, batch_size)
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------


def check_parity(
    model: nn.Module,
    exported_path: str | os.PathLike,
    inputs: Any,
    *,
    atol: float = 1e-4,
    batch_size: int = 256,
) -> dict[str, float]:
    """Check that an exported file computes the same logits as the PyTorch model.

    Args:
        model: the PyTorch model (run in eval mode; its mode is restored).
        exported_path: the ``.onnx`` or TorchScript file.
        inputs: samples ``(N, *input_shape)`` (tensor or numpy array).
        atol: the largest absolute difference of any logit allowed (float exports agree to
            about 1e-6; int8 files differ by far more: compare those by accuracy or
            ``argmax_agreement`` with a large ``atol``).
        batch_size: samples per forward pass.

    Returns:
        ``{"max_abs_diff": float, "tolerance": atol, "samples": N,
        "argmax_agreement": fraction of samples whose predicted class is the same}``.

    Raises:
        ExportParityError: the logits' shapes differ, or ``max_abs_diff > atol``; the
            message names the difference, the tolerance and what to try.
        FileNotFoundError, ValueError, MissingExtraError: as :func:`load_exported`.
    """
    if not atol >= 0:
        raise ValueError(f"atol must be >= 0, got {atol}")
    exported = load_exported(exported_path)
    x = _as_tensor(inputs, "inputs")
    expected = _torch_logits(model, x, batch_size)  # (N, C)
    got = _batched(exported, x, batch_size)  # (N, C')
    name = Path(exported_path).name
    if got.shape != expected.shape:
        raise ExportParityError(
            f"{name} returns logits of shape {tuple(got.shape)} but the PyTorch model returns "
            f"{tuple(expected.shape)} for the same {len(x)} inputs: the file was exported from another "
            f"model; export this model again"
        )
    diff = (got - expected).abs()
    max_abs_diff = float(diff.max()) if diff.numel() else 0.0
    if not np.isfinite(max_abs_diff):
        max_abs_diff = float("inf")
    agreement = float((got.argmax(-1) == expected.argmax(-1)).float().mean())
    report = {
        "max_abs_diff": max_abs_diff,
        "tolerance": float(atol),
        "samples": int(len(x)),
        "argmax_agreement": agreement,
    }
    if not max_abs_diff <= atol:
        raise ExportParityError(
            f"{name} differs from the PyTorch model: max |logit difference| {max_abs_diff:.3g} > tolerance "
            f"{atol:.3g} over {len(x)} samples (predicted class agrees on {100 * agreement:.1f}%). "
            f"If the file is stale or from another model, export this model again; if the model has "
            f"dropout or batch norm, make sure nothing changes it between export and check; if the "
            f"difference is rounding (an int8 file, another opset), raise atol or compare accuracy "
            f"with evaluate_exported()"
        )
    return report


def evaluate_exported(path: str | os.PathLike, x: Any, y: Any, batch_size: int = 256) -> float:
    """Top-1 accuracy of an exported model on labelled data.

    Args:
        path: the ``.onnx`` or TorchScript file.
        x: inputs ``(N, *input_shape)`` (tensor or numpy array).
        y: integer class labels ``(N,)``.
        batch_size: samples per forward pass.

    Returns:
        The fraction of samples whose highest logit is the label, in ``[0, 1]``.

    Raises:
        ValueError: ``x`` and ``y`` have different lengths, or ``y`` is not 1-D.
        FileNotFoundError, MissingExtraError: as :func:`load_exported`.
    """
    exported = load_exported(path)
    x = _as_tensor(x, "x")
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).cpu()
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"y must be labels of shape ({len(x)},) to match x {tuple(x.shape)}, got {tuple(y.shape)}")
    logits = _batched(exported, x, batch_size)  # (N, C)
    return float((logits.argmax(-1) == y.long()).float().mean())


# --------------------------------------------------------------------------------------
# int8
# --------------------------------------------------------------------------------------


def _int8_path(path: Path) -> Path:
    return path.with_name(f"{path.stem}.int8{path.suffix}")


def _calibration_reader(input_name: str, x: torch.Tensor, batch_size: int):
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        """Feeds ``x`` in batches ``{input_name: (b, *input_shape) float32}``."""

        def __init__(self):
            self.rewind()

        def get_next(self):
            return next(self._batches, None)

        def rewind(self):
            self._batches = ({input_name: x[i : i + batch_size].numpy()} for i in range(0, len(x), batch_size))

    return _Reader()


def _nonfinite_nodes(model_path: Path, sample: np.ndarray) -> list[str]:
    """Names of the nodes that produce or read non-finite values (``-inf`` padding before a
    max-pool, masks): their tensors cannot be given an int8 scale, so they stay float."""
    onnx = require_extra("onnx")
    ort = require_extra("onnxruntime")
    model = onnx.shape_inference.infer_shapes(onnx.load(str(model_path)))
    outputs = {o.name for o in model.graph.output}
    extra = [vi for vi in model.graph.value_info
             if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and vi.name not in outputs]
    model.graph.output.extend(extra)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {session.get_inputs()[0].name: sample})
    bad = {n for n, v in zip(names, values) if not np.isfinite(v).all()}
    return [node.name for node in model.graph.node if bad & (set(node.output) | set(node.input))]


def _name_nodes(model_path: Path) -> None:
    """Give every node a unique name (quantization excludes nodes by name)."""
    onnx = require_extra("onnx")
    model = onnx.load(str(model_path))
    seen: set[str] = set()
    changed = False
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
            changed = True
        seen.add(node.name)
    if changed:
        onnx.save(model, str(model_path))


def _quantize_onnx(
    source: Path, path: Path, calibration: torch.Tensor | None, method: str, per_channel: bool, batch_size: int
) -> str:
    """Quantize ``source`` into ``path`` (a temp file); returns the method used."""
    require_extra("onnxruntime")
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with _temp_beside(path) as pre:
        # 1. shape inference and graph clean-up, as onnxruntime recommends before quantizing
        try:
            quant_pre_process(str(source), str(pre))
        except Exception as e:
            warnings.warn(
                f"onnxruntime's pre-processing failed ({e}); quantizing the model as exported", RuntimeWarning
            )
            pre.write_bytes(source.read_bytes())
        _name_nodes(pre)
        input_name = ort_session(pre).get_inputs()[0].name
        logger = logging.getLogger()  # onnxruntime.quantization logs to the root logger
        level = logger.level
        logger.setLevel(logging.ERROR)
        try:
            if method in ("static", "auto") and calibration is not None:
                # 2. static: activation ranges from the calibration data, QDQ nodes around
                #    Conv/Gemm/MatMul/pooling, weights per output channel. uint8 weights and
                #    activations (U8U8): int8 weights (U8S8/S8S8) saturate int16 sums on x86
                #    CPUs without VNNI, which cost this file's logits ~20x the rounding error
                try:
                    exclude = _nonfinite_nodes(pre, calibration[:batch_size].numpy())
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)  # 0/0 in ranges of unused tensors
                        quantize_static(
                            str(pre),
                            str(path),
                            _calibration_reader(input_name, calibration, batch_size),
                            quant_format=QuantFormat.QDQ,
                            per_channel=per_channel,
                            activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QUInt8,
                            nodes_to_exclude=exclude,
                        )
                    return "static"
                except Exception as e:
                    if method == "static":
                        raise
                    warnings.warn(
                        f"static int8 quantization failed ({type(e).__name__}: {e}); using dynamic quantization",
                        RuntimeWarning,
                    )
            # 3. dynamic: 8-bit weights, activations quantized per batch at run time
            #    (uint8 weights, for the same reason as above)
            quantize_dynamic(str(pre), str(path), per_channel=per_channel, weight_type=QuantType.QUInt8)
            return "dynamic"
        finally:
            logger.setLevel(level)


def quantize_int8(
    source: nn.Module | str | os.PathLike,
    path: str | os.PathLike | None = None,
    *,
    calibration: Any = None,
    example_input: Any = None,
    method: str = "auto",
    per_channel: bool = True,
    batch_size: int = 64,
) -> Path:
    """Write an int8 version of a model: smaller, usually faster on CPUs.

    ONNX (``path`` ends in ``.onnx``; ``source`` a float ``.onnx`` file, or an
    ``nn.Module`` that is exported first): onnxruntime's quantization.

    - ``method="static"``: activation ranges measured on ``calibration``, QDQ format, 8-bit
      weights and activations (per output channel with ``per_channel``): convolutions,
      linear layers and pooling all run in 8-bit integers. Both are unsigned (U8U8):
      signed weights saturate on x86 CPUs without VNNI and lose much more accuracy there.
      Nodes whose tensors hold non-finite values (the ``-inf`` padding before a "same"
      max-pool) stay float.
    - ``method="dynamic"``: int8 weights, activations quantized per batch at run time; no
      calibration data needed.
    - ``method="auto"`` (the default): static when ``calibration`` is given (falling back
      to dynamic, with a warning, if that fails), dynamic otherwise.

    TorchScript (``path`` ends in ``.pt``/``.ts``/...; ``source`` must be the
    ``nn.Module``; deprecated upstream, issues a ``DeprecationWarning``: prefer ONNX):
    ``torch.ao.quantization.quantize_dynamic`` on ``nn.Linear`` layers, then traced.
    Convolutions stay float there (PyTorch's dynamic quantization has no int8
    convolutions), so a CNN shrinks only by its linear layers.

    Args:
        source: the float ``.onnx`` file, or the PyTorch model.
        path: the int8 file to write; ``None`` for ``<source stem>.int8.onnx`` beside a
            source file.
        calibration: representative inputs ``(N, *input_shape)`` (a few hundred training
            samples) for static ONNX quantization.
        example_input: a batch ``(B, *input_shape)`` to export or trace an ``nn.Module``
            source; defaults to the first samples of ``calibration``.
        method: ``"auto"``, ``"static"`` or ``"dynamic"`` (ONNX only).
        per_channel: one weight scale per output channel (more accurate, same size).
        batch_size: calibration samples per forward pass.

    Returns:
        The path of the int8 file.

    Raises:
        ValueError: unknown ``method`` or format (a ``.pt2`` target included),
            ``method="static"`` without ``calibration``, a TorchScript target from a file
            source, or a file source with ``path=None`` that is not ONNX.
        FileNotFoundError: the source file does not exist.
        MissingExtraError: ONNX quantization without ``onnx``/``onnxruntime`` installed.
        ModelInputError: calibration or example inputs of the wrong shape.
    """
    if method not in ("auto", "static", "dynamic"):
        raise ValueError(f"method must be 'auto', 'static' or 'dynamic', got {method!r}")
    if method == "static" and calibration is None:
        raise ValueError("method='static' needs calibration inputs (N, *input_shape); pass calibration=x_train[:512]")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    is_module = isinstance(source, nn.Module)
    if path is None:
        if is_module:
            raise ValueError("give the int8 file's path when quantizing an nn.Module")
        path = _int8_path(Path(source))
    path = Path(path)
    fmt = export_format(path)
    if fmt == "pt2":
        raise ValueError(f"quantize_int8 writes ONNX (.onnx) or TorchScript int8 files, not .pt2 ({str(path)!r}); "
                         f"quantize to ONNX: give a path ending in .onnx")
    cal = _as_tensor(calibration, "calibration") if calibration is not None else None
    if example_input is None and cal is not None:
        example_input = cal[:2]

    if fmt == "torchscript":
        if not is_module:
            raise ValueError(
                f"a TorchScript int8 file is made from the PyTorch model, not from {str(source)!r}: "
                f"pass the nn.Module as source (and example_input)"
            )
        if example_input is None:
            raise ValueError("quantizing to TorchScript needs example_input (B, *input_shape) to trace the model")
        warnings.warn(_AO_DEPRECATED, DeprecationWarning, stacklevel=2)
        model = _cpu_eval_copy(source)
        x = _example_batch(model, example_input)
        with _quiet_torch_export():
            qmodel = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        return _save_torchscript(qmodel, x, path)

    # ONNX
    if is_module:
        if example_input is None:
            raise ValueError("quantizing an nn.Module to ONNX needs example_input or calibration to export it")
        with _temp_beside(path) as float_file:
            export_onnx(source, example_input, float_file)
            return quantize_int8(
                float_file, path, calibration=cal, method=method, per_channel=per_channel, batch_size=batch_size
            )
    source = _existing_file(source)
    if export_format(source) != "onnx":
        raise ValueError(f"ONNX int8 needs a float .onnx source file or the nn.Module, got {str(source)!r}")
    if cal is not None:
        expected = load_exported(source).input_shape
        if expected is not None and tuple(cal.shape[1:]) != tuple(expected):
            raise ModelInputError(
                f"calibration inputs have shape {tuple(cal.shape)}, but {source.name} expects "
                f"(N, {', '.join(map(str, expected))})"
            )
    with _temp_beside(path) as tmp:
        _quantize_onnx(source, tmp, cal, method, per_channel, batch_size)
        return replace_durably(tmp, path)


__all__ = [
    "ExportedModel",
    "check_parity",
    "evaluate_exported",
    "export_format",
    "export_onnx",
    "export_pt2",
    "export_torchscript",
    "load_exported",
    "ort_session",
    "quantize_int8",
    "require_extra",
]
