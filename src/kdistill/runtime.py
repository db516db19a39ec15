"""Where code runs and how repeatable it is: device, threads and seeds.

Nothing else in kdistill picks a device or seeds a generator on its own.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def get_device(device: str | torch.device | None = None) -> torch.device:
    """Resolve the device to run on.

    Args:
        device: an explicit choice (``"cpu"``, ``"cuda:1"``, a ``torch.device``), or
            ``None`` for the default: ``$KDISTILL_DEVICE`` if set, else (in a
            multi-process run) this process's GPU ``cuda:LOCAL_RANK`` or the CPU, else
            CUDA when available, else Apple's MPS when available, else the CPU.

    Returns:
        The ``torch.device``.
    """
    if device is None:
        device = os.environ.get("KDISTILL_DEVICE") or None
    if device is None:
        from . import distributed

        if distributed.is_distributed():  # one of several processes: its own GPU, or the CPU
            return distributed.device()
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    return torch.device(device)


def module_device(module: torch.nn.Module) -> torch.device:
    """The device a module lives on: that of its first parameter, else of its first buffer.

    Args:
        module: any ``nn.Module``.

    Returns:
        The ``torch.device``; the CPU for a module without parameters and buffers.
    """
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's global generators (all devices).

    With the same seed, initial weights, data and thread count, training on the CPU is
    repeatable bit for bit: kdistill draws every shuffle from generators seeded from here.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The state of Python's, NumPy's and PyTorch's global generators (CPU and CUDA), in
    a form ``torch.load(weights_only=True)`` reads back: what a resumed run restores."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the generators saved by :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def set_threads(num_threads: int | None) -> int:
    """Set PyTorch's intra-op thread count (``None`` leaves it as it is); returns it."""
    if num_threads is not None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {num_threads}")
        torch.set_num_threads(num_threads)
    return torch.get_num_threads()


def machine_description() -> dict:
    """A short description of this machine, for reports and benchmark JSON."""
    import platform

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
