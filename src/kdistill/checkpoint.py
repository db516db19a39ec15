"""Checkpoints that refuse to load into the wrong model.

Checkpoints and training states are written atomically (:mod:`kdistill.atomic`): a crash
leaves either the old file or the new one, never half of one.

A teacher trained elsewhere comes in through :func:`load_weights`: it reads a kdistill
checkpoint, a plain PyTorch ``state_dict`` file (also nested in a Lightning-style dict, or
with the ``module.`` / ``_orig_mod.`` prefix of DDP and ``torch.compile``) or a
``.safetensors`` file, never unpickles code (``weights_only``), and loads strictly: every
tensor of the model must be in the file with its shape, or nothing is loaded and the error
lists what differs. :func:`save_weights` writes a student's or teacher's weights as a
``.safetensors`` file (tensors only, no pickled code), atomically.

Every checkpoint and training state carries ``content_sha256``, a SHA-256 of everything it
holds (tensor bytes, shapes, dtypes and the other values), checked whenever it is read:
bytes changed on disk after the write (a failing disk, a bad copy) raise
:class:`CheckpointError` instead of loading wrong weights silently. Files written before
the digest existed have none and are read as they are.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_torch_save, replace_durably, temp_path_beside
from .errors import CheckpointError

FORMAT = "kdistill-checkpoint"
FORMAT_VERSION = 1
#: The payload entry holding :func:`content_digest` of the rest of the payload.
DIGEST_KEY = "content_sha256"


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_digest(obj: Any) -> str:
    """SHA-256 (hex) of a payload: dicts (in their order), lists, tuples, tensors (dtype,
    shape and bytes) and plain values (their ``repr``). The same for the object written
    and the object ``torch.load`` reads back, whatever device it is mapped to."""
    h = hashlib.sha256()
    _digest_into(h, obj)
    return h.hexdigest()


def _digest_into(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        t = t.cpu().contiguous().reshape(-1)
        try:
            h.update(t.view(torch.uint8).numpy().tobytes())
        except (RuntimeError, TypeError):  # dtypes without a byte view (quantized, ...)
            h.update(repr(t.tolist()).encode())
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            h.update(repr(k).encode())
            _digest_into(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for v in obj:
            _digest_into(h, v)
    else:
        h.update(f"V{obj!r}".encode())


def _with_digest(payload: dict[str, Any]) -> dict[str, Any]:
    return {**payload, DIGEST_KEY: content_digest(payload)}


def _check_digest(payload: dict[str, Any], path: Path, what: str, fix: str) -> None:
    """Pop and verify the payload's digest (absent in files of older versions: no check)."""
    expected = payload.pop(DIGEST_KEY, None)
    if expected is None:
        return
    found = content_digest(payload)
    if found != expected:
        raise CheckpointError(
            f"{what} {path} is corrupt: the SHA-256 of its contents is {found}, but {expected} was recorded "
            f"when it was written, so its bytes changed on disk since (a failing disk, an interrupted or "
            f"damaged copy, an edit). {fix}"
        )


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
    return atomic_torch_save(_with_digest(payload), path)


def read_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and check a checkpoint file without loading it into a model.

    Raises:
        CheckpointError: if the file is missing, truncated, corrupt (its contents differ
            from the digest recorded at the write) or not a kdistill checkpoint.
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
            "weights (a torch.save(model.state_dict()) file, a Lightning or DDP checkpoint, or "
            "a .safetensors file) use kdistill.checkpoint.load_weights(path, model), which "
            "checks every key and shape, rather than model.load_state_dict(torch.load(path))."
        )
    _check_digest(payload, path, "checkpoint", "Delete it and train again, or point to an intact copy.")
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


# --- weights in other formats -------------------------------------------------------

#: Entries under which training scripts nest the state_dict (Lightning: "state_dict").
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
#: Key prefixes added by wrappers: DDP / DataParallel, torch.compile, a LightningModule's
#: ``self.model``. One is stripped only when every key has it and the result fits the model.
STRIP_PREFIXES = ("module.", "_orig_mod.", "model.")
_SHOW = 5  # how many keys an error message lists


def save_weights(path: str | os.PathLike, model: nn.Module, *, metadata: Mapping[str, str] | None = None) -> Path:
    """Save a model's weights (a student's or a teacher's) as a safetensors file, atomically.

    The file holds the ``state_dict``'s tensors and nothing that runs code; it loads back
    with :func:`load_weights` (which checks every name and shape against the model it
    loads into), or with ``safetensors.torch.load_model`` elsewhere. Tensors that share
    memory (tied weights) are stored once, as ``safetensors.torch.save_model`` does;
    :func:`load_weights` fills the other names from it. The header's metadata records
    ``format: pt``, ``kdistill_version`` and ``model_name``, plus ``metadata``.

    Args:
        path: the file to write (by convention ending ``.safetensors``); its folder is
            created if missing. Written as a temporary file beside it, then renamed.
        model: the network (for a :class:`~kdistill.teacher.LiveTeacher`, its ``module``).
        metadata: more ``{str: str}`` entries for the file's header.

    Returns:
        The path written.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or ``metadata`` holds non-strings.
        CheckpointError: the ``state_dict`` holds entries that are not tensors (extra
            state): safetensors stores tensors only; use :func:`save_checkpoint`.
    """
    from safetensors.torch import save_model

    from . import __version__

    if not isinstance(model, nn.Module):
        hint = " (a LiveTeacher: pass its .module)" if isinstance(getattr(model, "module", None), nn.Module) else ""
        raise TypeError(f"model must be a torch.nn.Module{hint}, got {type(model).__name__}")
    extra = dict(metadata or {})
    bad = [f"{k!r}: {type(v).__name__}" for k, v in extra.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise TypeError(f"safetensors metadata maps strings to strings; these entries are not: {', '.join(bad[:_SHOW])}")
    not_tensors = [k for k, v in model.state_dict().items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{model_name(model)}'s state_dict holds entries that are not tensors ({', '.join(not_tensors[:_SHOW])}), "
            "which a safetensors file cannot store; save it with kdistill.checkpoint.save_checkpoint instead")
    header = {"format": "pt", "kdistill_version": __version__, "model_name": model_name(model), **extra}
    path = Path(path)
    with temp_path_beside(path, suffix=".tmp.safetensors") as tmp:
        save_model(model, str(tmp), metadata=header, force_contiguous=True)
        return replace_durably(tmp, path)


def load_weights(
    path: str | os.PathLike, model: nn.Module, *, map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load trained weights from a kdistill, PyTorch or safetensors file into ``model``.

    Accepted files:

    1. a kdistill checkpoint (:func:`save_checkpoint`), loaded by :func:`load_checkpoint`;
    2. a PyTorch ``state_dict`` file (``torch.save(model.state_dict(), path)``, any name),
       also nested under a ``"state_dict"``, ``"model_state_dict"``, ``"model"``,
       ``"module"`` or ``"net"`` entry, and with keys prefixed ``module.`` (DDP),
       ``_orig_mod.`` (``torch.compile``) or ``model.`` (a LightningModule attribute);
    3. a safetensors file (by its ``.safetensors`` name or by its content).

    Files are read without unpickling code (``torch.load(weights_only=True)``). Loading is
    strict: every tensor of ``model`` must be in the file, with its shape, and the file may
    hold nothing else; otherwise nothing is loaded. Tensors stored in another floating
    dtype (a float16 or bfloat16 file) are cast to the model's dtype.

    Args:
        path: the weights file.
        model: the model to load into, built with the architecture the file was saved from.
        map_location: where tensors are read to before they are copied into ``model``.

    Returns:
        What was loaded: ``format`` (``"kdistill"``, ``"state_dict"`` or
        ``"safetensors"``), ``path``, ``sha256`` (of the file's bytes), ``tensors`` (how
        many), ``wrapper`` (the entry the state_dict was nested under, or None),
        ``stripped_prefix`` (or None), ``cast_from`` (the file's dtypes that were cast, e.g.
        ``"torch.float16"``, or None); for a kdistill checkpoint also the metadata
        :func:`load_checkpoint` returns (``epoch``, ``metrics``, ``extra``, ...).

    Raises:
        CheckpointError: the file is missing, unreadable or corrupt, is a pickled object
            rather than weights (e.g. ``torch.save(model)``), holds no name -> tensor
            mapping, or does not fit ``model`` (missing or unexpected keys, other shapes).
            ``model`` is unchanged when it is raised.
    """
    path = Path(path)
    _check_is_file(path)
    # 1. read the file: the reader its name or first bytes suggest, then the other one
    with open(path, "rb") as f:
        head = f.read(16)
    readers = ["torch", "safetensors"]
    if path.suffix.lower() == ".safetensors" or _looks_like_safetensors(head, path.stat().st_size):
        readers.reverse()
    errors: dict[str, str] = {}
    payload: Any = None
    fmt = None
    for reader in readers:
        try:
            payload = _read_torch(path, map_location) if reader == "torch" else _read_safetensors(path, map_location)
        except _PickledObject as e:
            raise CheckpointError(
                f"{path} holds pickled Python objects, not only tensors: it references "
                f"'{e.name}', which weights-only loading refuses because unpickling it could run "
                "arbitrary code. This is what torch.save(model) writes for a whole nn.Module. "
                "Save the weights instead, with torch.save(model.state_dict(), path) (or "
                "safetensors.torch.save_model(model, path)), and load that file."
            ) from None
        except Exception as e:
            errors[reader] = _first_line(e)
            continue
        fmt = reader
        break
    if fmt is None:
        size = path.stat().st_size
        tried = " nor ".join(
            f"as {'a PyTorch file' if r == 'torch' else 'safetensors'} ({errors[r]})" for r in readers
        )
        state = "is empty" if size == 0 else "is truncated or corrupt"
        raise CheckpointError(
            f"weights file {path} ({size} bytes) {state}: it cannot be read {tried}. Expected a "
            "kdistill checkpoint, a torch.save(model.state_dict()) file or a .safetensors file; "
            "point to an intact copy (copy or download it again, or save it again)."
        )
    digest = _sha256(path)

    # 2. a kdistill checkpoint carries its own signature check
    if fmt == "torch" and isinstance(payload, Mapping) and payload.get("format") == FORMAT:
        meta = load_checkpoint(path, model, map_location=map_location)
        return {
            "format": "kdistill", "path": str(path), "sha256": digest,
            "tensors": len(payload["state_dict"]), "wrapper": None, "stripped_prefix": None,
            "cast_from": None, **meta,
        }

    # 3. find the state_dict, fit its keys, shapes and dtypes to the model, then load
    state, wrapper = _unwrap_state_dict(payload, path)
    expected = model.state_dict()
    state, prefix = _strip_prefix(state, expected)
    state, cast_from = _fit_to_model(state, expected, model, path, wrapper, prefix)
    model.load_state_dict(state, strict=True)
    return {
        "format": "safetensors" if fmt == "safetensors" else "state_dict",
        "path": str(path), "sha256": digest, "tensors": len(state), "wrapper": wrapper,
        "stripped_prefix": prefix, "cast_from": cast_from,
    }


class _PickledObject(Exception):
    """The file is a pickle that references a global (a class or function) weights-only
    loading refuses."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _check_is_file(path: Path) -> None:
    if path.is_file():
        return
    what = ("a file of trained weights, such as the teacher's checkpoint: a kdistill "
            "checkpoint, a torch.save(model.state_dict()) file or a .safetensors file")
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir()
                        if p.suffix.lower() in (".safetensors", ".pt", ".pth", ".bin", ".ckpt"))
        hint = f" It contains {inside[:_SHOW]}: pass one of those files." if inside else ""
        raise CheckpointError(f"{path} is a directory; expected {what}.{hint}")
    shown = path if path.is_absolute() else f"{path} ({path.absolute()})"
    raise CheckpointError(
        f"no weights file at {shown}: the file does not exist. Expected {what}; check the "
        "path, or train and save the model first."
    )


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """A safetensors file starts with an 8-byte little-endian header length, then JSON."""
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n <= size - 8 and head[8:9] == b"{"


def _read_torch(path: Path, map_location: Any) -> Any:
    try:
        # an open file, not the name: recent torch sends names ending .safetensors elsewhere
        with open(path, "rb") as f:
            return torch.load(f, map_location=map_location, weights_only=True)
    except Exception as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found:
            raise _PickledObject(found.group(1)) from e
        raise


def _read_safetensors(path: Path, map_location: Any) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path, device=str(map_location))


def _first_line(e: BaseException) -> str:
    """The reader's own first line of its error (weights-only errors put it after a
    preamble)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    line = next((x.strip() for x in text.splitlines() if x.strip()), "no message")
    return f"{type(e).__name__}: {line.split('. ')[0][:200]}"


def _sha256(path: Path) -> str:
    return file_sha256(path)


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _unwrap_state_dict(payload: Any, path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The name -> tensor mapping in ``payload``, and the entry it was nested under."""
    wrapper = None
    if isinstance(payload, Mapping) and not _is_state_dict(payload):
        key = next((k for k in WRAPPER_KEYS if _is_state_dict(payload.get(k))), None)
        if key is not None:
            payload, wrapper = payload[key], key
    if _is_state_dict(payload):
        return dict(payload), wrapper
    expected = ("Expected a mapping of tensor name -> tensor (what model.state_dict() returns), "
                f"at the top level or under one of {list(WRAPPER_KEYS)}")
    if not isinstance(payload, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(payload).__name__}, not a mapping of tensor name -> tensor. "
            f"{expected}: save it with torch.save(model.state_dict(), path)."
        )
    if not payload:
        raise CheckpointError(f"{path} holds an empty mapping: no tensors to load. {expected}.")
    if payload.get("format") == "kdistill-training-state":
        raise CheckpointError(
            f"{path} is a kdistill training state (to resume fit), not a file of weights: "
            "load the model checkpoint saved beside it (e.g. best.pt or last.pt) instead."
        )
    bad = [f"{k!r} ({type(v).__name__})" for k, v in payload.items()
           if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    raise CheckpointError(
        f"{path} holds a mapping that is not a state_dict: {len(bad)} of its {len(payload)} "
        f"entries are not tensors (first: {', '.join(bad[:_SHOW])}). {expected}: pass the "
        "state_dict itself, saved with torch.save(model.state_dict(), path)."
    )


def _strip_prefix(state: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> tuple[dict, str | None]:
    """Remove wrapper prefixes that every key has (``module.``, ``_orig_mod.``, ...).

    Returns the stripped state and the prefix when the stripped keys are exactly the
    model's; otherwise the variant (stripped or not) sharing most keys with the model, so
    an error reports the real differences, with the prefix it was compared without.
    """
    want = set(expected)
    best, best_prefix, best_overlap = state, None, len(want & set(state))
    if best_overlap == len(want) == len(state):
        return state, None
    keys, prefix = list(state), ""
    while True:
        p = next((p for p in STRIP_PREFIXES if all(k.startswith(p) for k in keys)), None)
        if p is None:
            return best, best_prefix
        keys, prefix = [k[len(p):] for k in keys], prefix + p
        overlap = len(want & set(keys))
        if overlap > best_overlap:
            best = {k[len(prefix):]: v for k, v in state.items()}
            best_prefix, best_overlap = prefix, overlap
        if set(keys) == want:
            return best, best_prefix


def _fit_to_model(
    state: dict[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    model: nn.Module,
    path: Path,
    wrapper: str | None,
    prefix: str | None,
) -> tuple[dict[str, torch.Tensor], str | None]:
    """Check ``state`` against the model's state_dict and cast it to the model's dtypes.

    Returns the state to load and the file dtypes that were cast (None if none).

    Raises:
        CheckpointError: keys missing or unexpected, shapes or kinds of dtype that differ.
    """
    state = dict(state)
    # 1. tied tensors (one storage under two names) are saved once by safetensors'
    #    save_model: fill a missing alias from the name that is present
    for k in [k for k in expected if k not in state]:
        alias = next((a for a in state if a in expected and _same_storage(expected[a], expected[k])), None)
        if alias is not None:
            state[k] = state[alias]
    # 2. compare names, shapes and kinds of dtype
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shared = [k for k in expected if k in state]
    reshaped = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                for k in shared if state[k].shape != expected[k].shape]
    kinds = [f"{k}: file {state[k].dtype} vs model {expected[k].dtype}"
             for k in shared if _dtype_kind(state[k].dtype) != _dtype_kind(expected[k].dtype)]
    if missing or unexpected or reshaped or kinds:
        raise CheckpointError(_mismatch_message(
            path, model, wrapper, prefix, state, list(expected), missing, unexpected, reshaped, kinds,
            fitting=len(shared) - len(reshaped),
        ))
    # 3. cast floating tensors stored in another precision (float16 file, float32 model)
    cast = sorted({str(state[k].dtype) for k in state if state[k].dtype != expected[k].dtype})
    state = {k: v.to(expected[k].dtype) for k, v in state.items()}
    return state, ", ".join(cast) or None


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or a.device.type == "meta" or a.device != b.device:
        return False
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset() and a.shape == b.shape and a.stride() == b.stride())


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype.is_floating_point:
        return "float"
    if dtype.is_complex:
        return "complex"
    return "bool" if dtype == torch.bool else "int"


def _mismatch_message(path, model, wrapper, prefix, state, expected_keys, missing, unexpected, reshaped, kinds,
                      fitting) -> str:
    def plural(n: int, word: str) -> str:
        return f"{n} {word}" + ("" if n == 1 else "s")

    def first(items: list[str]) -> str:
        return ", ".join(items[:_SHOW]) + (", ..." if len(items) > _SHOW else "")

    cls = type(model).__name__
    name = model_name(model)
    label = f"'{name}' (class {cls})" if name != cls else f"of class {cls}"
    where = f"under the file's '{wrapper}' entry" if wrapper else "in the file"
    problems = []
    if missing:
        problems.append(f"{len(missing)} of the model's {plural(len(expected_keys), 'key')} "
                        f"{'is' if len(missing) == 1 else 'are'} missing from the file ({first(missing)})")
    if unexpected:
        problems.append(f"the file has {plural(len(unexpected), 'key')} the model does not have ({first(unexpected)})")
    if reshaped:
        problems.append(f"{plural(len(reshaped), 'shape')} {'differs' if len(reshaped) == 1 else 'differ'} "
                        f"({first(reshaped)})")
    if kinds:
        problems.append(f"{plural(len(kinds), 'tensor')} of another kind of dtype ({first(kinds)})")
    stripped = f" (compared without the prefix '{prefix}' that every key had)" if prefix else ""
    text = (f"weights in {path} do not fit model {label}: the {plural(len(state), 'tensor')} {where}"
            f"{stripped} were expected to match the model's names and shapes exactly, but "
            f"{'; '.join(problems)}. Nothing was loaded.")
    if fitting == 0:
        return (f"{text} Not one tensor matches by name and shape: the file most likely holds "
                f"the weights of another architecture than {cls}. Build the model the file was "
                "saved from and load into that.")
    return (f"{text} Build the model exactly as when the file was saved (same class and "
            "constructor arguments) and load again; partial loading is never done silently.")


TRAINING_STATE_FORMAT = "kdistill-training-state"


def save_training_state(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write a trainer's resumable state (:meth:`kdistill.Trainer.training_state`) atomically."""
    payload = {"format": TRAINING_STATE_FORMAT, "format_version": FORMAT_VERSION, **state}
    return atomic_torch_save(_with_digest(payload), path)


def read_training_state(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a file written by :func:`save_training_state`.

    Raises:
        CheckpointError: missing, truncated or corrupt file (contents that differ from the
            digest recorded at the write included), or not a training state.
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
    _check_digest(state, path, "training state", "Delete it to restart the stage from its beginning.")
    return state
