"""Atomic writes and checkpoints that refuse to load into the wrong model.

Every file kdistill writes goes to a temporary file in the same folder first and is then
renamed over the target (``os.replace`` is atomic on POSIX and Windows): a crash leaves
either the old file or the new one, never half of one.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import CheckpointError

FORMAT = "kdistill-checkpoint"
FORMAT_VERSION = 1


def atomic_write(path: str | os.PathLike, write: Callable[[Any], None], *, mode: str = "wb") -> Path:
    """Write a file atomically: ``write(fileobj)`` fills a temp file, then it is renamed.

    Args:
        path: the destination.
        write: called with the open temporary file.
        mode: ``"wb"`` or ``"w"``.

    Returns:
        The destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def model_signature(model: nn.Module) -> dict[str, list[int]]:
    """``{parameter or buffer name: shape}``: what a checkpoint must match to load."""
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def model_name(model: nn.Module) -> str:
    """The builder name a model was made with (``kdistill_name``), else its class name."""
    return getattr(model, "kdistill_name", None) or type(model).__name__


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    epoch: int | None = None,
    metrics: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Save a model (and optionally its optimizer) atomically.

    The file records the model's name and the shape of every tensor, so
    :func:`load_checkpoint` can refuse a checkpoint of another model with a useful message.
    """
    from . import __version__

    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kdistill_version": __version__,
        "model_name": model_name(model),
        "signature": model_signature(model),
        "state_dict": model.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "epoch": epoch,
        "metrics": dict(metrics or {}),
        "extra": dict(extra or {}),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def read_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and check a checkpoint file without loading it into a model.

    Raises:
        CheckpointError: if the file is missing, truncated, corrupt or not a kdistill checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: the file does not exist")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for damaged zip archives
        raise CheckpointError(
            f"checkpoint {path} ({path.stat().st_size} bytes) is truncated or corrupt and cannot "
            f"be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}). Delete it and train "
            "again, or point to an intact copy."
        ) from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a kdistill checkpoint (no '{FORMAT}' marker). To load plain "
            "weights use model.load_state_dict(torch.load(path))."
        )
    return payload


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (and ``optimizer``).

    Returns:
        The checkpoint's metadata: ``epoch``, ``metrics``, ``extra``, ``model_name``.

    Raises:
        CheckpointError: truncated or corrupt file, or weights of another model (the message
            names both models and the first tensors that differ).
    """
    payload = read_checkpoint(path, map_location=map_location)
    expected, found = model_signature(model), payload["signature"]
    if expected != found:
        missing = [k for k in expected if k not in found]
        unexpected = [k for k in found if k not in expected]
        reshaped = [f"{k}: {found[k]} vs {expected[k]}" for k in expected if k in found and found[k] != expected[k]]
        details = "; ".join(
            part
            for part in (
                f"missing {missing[:3]}" if missing else "",
                f"unexpected {unexpected[:3]}" if unexpected else "",
                f"different shapes (checkpoint vs model) {reshaped[:3]}" if reshaped else "",
            )
            if part
        )
        raise CheckpointError(
            f"checkpoint {path} holds weights of model '{payload.get('model_name')}', which do not "
            f"fit model '{model_name(model)}': {details}. Load it into the architecture it was "
            "saved from (same builder and arguments)."
        )
    model.load_state_dict(payload["state_dict"])
    if optimizer is not None and payload.get("optimizer") is not None:
        optimizer.load_state_dict(payload["optimizer"])
    return {k: payload.get(k) for k in ("epoch", "metrics", "extra", "model_name", "kdistill_version")}


TRAINING_STATE_FORMAT = "kdistill-training-state"


def save_training_state(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write a trainer's resumable state (:meth:`kdistill.Trainer.training_state`) atomically."""
    buffer = io.BytesIO()
    torch.save({"format": TRAINING_STATE_FORMAT, "format_version": FORMAT_VERSION, **state}, buffer)
    return atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def read_training_state(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a file written by :func:`save_training_state`.

    Raises:
        CheckpointError: missing, truncated or corrupt file, or not a training state.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no training state at {path}: the file does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"training state {path} ({path.stat().st_size} bytes) is truncated or corrupt "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); delete it to restart the stage"
        ) from e
    if not isinstance(state, dict) or state.get("format") != TRAINING_STATE_FORMAT:
        raise CheckpointError(f"{path} is not a kdistill training state (no '{TRAINING_STATE_FORMAT}' marker)")
    return state
