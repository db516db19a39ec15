"""The on-disk format of a teacher cache: names, encoding, fingerprints, the manifest.

Everything that decides what the bytes in a cache directory mean lives here; building
(:mod:`.build`) and serving (:mod:`.serve`) read and write through it. The layout and the
top-k tail are described in :mod:`kdistill.teacher.cache`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ...errors import CheckpointError, KDistillError

FORMAT = "kdistill-teacher-cache"

FORMAT_VERSION = 1

MANIFEST = "manifest.json"

PROGRESS = "progress.json"

VIEW_SEEDS = "view_seeds.npy"

DTYPES = {"float16": np.float16, "float32": np.float32}

_FLOAT16_MAX = float(np.finfo(np.float16).max)

#: How far below the smallest stored top-k logit a rebuilt tail logit may lie: keeps it
#: finite (a tail of exactly zero mass, ``-inf``, would give ``0 * inf = nan`` in a KL).
_TAIL_FLOOR = 1e4

TAIL_DESCRIPTION = (
    "tail.npy[i] = logsumexp of the C-k logits outside the top k at T=1 (float32); "
    "tail mass = exp(tail - logsumexp(topk_values, tail)); rebuilt logits fill the other "
    "classes with tail - log(C-k). tail_at.npy[i, j] (if tail_temperatures) = logsumexp of "
    "the same logits / tail_temperatures[j]; opened at that T the fill is T * (tail_at - log(C-k))"
)



class CacheError(CheckpointError):
    """A teacher cache directory is missing, incomplete, of an unknown format, truncated
    or corrupt (a file's checksum differs from its manifest)."""



class CacheMismatchError(KDistillError, ValueError):
    """A teacher cache was built from another teacher or another dataset than the one
    given, or is asked for samples it does not hold."""


# --------------------------------------------------------------------------- fingerprints
def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor (any dtype, any device), C order."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy())



def teacher_module(teacher: Any) -> nn.Module:
    """The network of a teacher given as a module or as a wrapper with ``.module``."""
    module = teacher if isinstance(teacher, nn.Module) else getattr(teacher, "module", None)
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"teacher must be a torch.nn.Module (or a LiveTeacher), got {type(teacher).__name__}"
        )
    return module



def teacher_fingerprint(teacher: nn.Module) -> str:
    """SHA-256 of a network's ``state_dict``: every tensor's name, shape, dtype and bytes,
    in order.

    Args:
        teacher: the network (or a :class:`~kdistill.teacher.LiveTeacher`).

    Returns:
        ``"sha256:<hex>"``; equal for two networks exactly when their weights and buffers
        (and their names) are.
    """
    h = hashlib.sha256()
    for name, value in teacher_module(teacher).state_dict().items():
        if not isinstance(value, torch.Tensor):
            continue  # extra state that is not a tensor carries no weights
        h.update(f"{name}|{list(value.shape)}|{value.dtype}\n".encode())
        h.update(_tensor_bytes(value))
    return "sha256:" + h.hexdigest()



def as_inputs(x: Any) -> torch.Tensor:
    """``x`` as the tensor ``fit`` would batch (float64 becomes float32)."""
    from ...data.loader import as_tensor

    if not isinstance(x, (torch.Tensor, np.ndarray)):
        raise TypeError(
            f"x must be a numpy array or a torch.Tensor of shape (N, ...), got {type(x).__name__}; "
            "for a Dataset, stack its inputs first (e.g. torch.stack([dataset[i][0] for i in range(len(dataset))]))"
        )
    t = as_tensor(x, name="x")
    if t.dim() < 1 or t.shape[0] == 0:
        raise ValueError(f"x must hold at least one sample along its first axis, got shape {tuple(t.shape)}")
    return t



def dataset_fingerprint(x: torch.Tensor | np.ndarray) -> str:
    """SHA-256 of a dataset's inputs: shape, dtype and bytes, as ``fit`` sees them.

    The data is converted as :func:`~kdistill.data.loader.as_tensor` does for ``fit``
    (float64 becomes float32), so an array and the tensor made from it agree.

    Args:
        x: ``(N, ...)`` numpy array or tensor.

    Returns:
        ``"sha256:<hex>"``.
    """
    t = as_inputs(x)
    h = hashlib.sha256()
    h.update(f"{list(t.shape)}|{t.dtype}\n".encode())
    h.update(_tensor_bytes(t))
    return "sha256:" + h.hexdigest()



def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()



# --------------------------------------------------------------------------- encoding
def make_view_seeds(seed: int, views: int, n: int) -> np.ndarray:
    """``(views, n)`` int64 seeds of every sample's views, a function of ``seed`` alone."""
    return np.random.default_rng(seed).integers(0, np.iinfo(np.int64).max, size=(views, n), dtype=np.int64)



def feature_file(name: str, taken: set[str]) -> str:
    """A file name for a tapped layer (``"fc:input"`` -> ``"feature.fc_input.npy"``)."""
    base = "feature." + re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    fname, i = base + ".npy", 1
    while fname in taken:
        fname, i = f"{base}.{i}.npy", i + 1
    return fname



def encode(logits: torch.Tensor, captured: dict[str, torch.Tensor], features: list[str], mode: str,
            k: int | None, tail_temperatures: list[float], dtype: str, start: int) -> dict[str, np.ndarray]:
    """One batch's outputs as the arrays stored: ``{file name: (B, ...) array}``."""
    np_dtype = DTYPES[dtype]
    z = logits.detach().float().cpu()
    if torch.isnan(z).any():
        row = start + int(torch.isnan(z).flatten(1).any(1).nonzero()[0])
        raise ValueError(
            f"the teacher produced NaN logits (first at sample {row} of x); a cache of them would "
            "train the student on NaN. Check the teacher's weights and the inputs."
        )

    def store(name: str, t: torch.Tensor) -> np.ndarray:
        t = t.detach().float()
        if dtype == "float16":
            big = torch.isfinite(t) & (t.abs() > _FLOAT16_MAX)
            if big.any():
                raise ValueError(
                    f"{name} of the teacher reach {float(t[big].abs().max()):.4g}, beyond float16's range "
                    f"({_FLOAT16_MAX:.0f}), in the batch starting at sample {start}; build with dtype='float32'"
                )
        return t.cpu().numpy().astype(np_dtype)

    out: dict[str, np.ndarray] = {}
    if mode == "full":
        out["logits.npy"] = store("logits", z)
    else:
        c = z.shape[-1]
        if k >= c:
            raise ValueError(
                f"k={k} must be smaller than the teacher's {c} classes in mode='topk'; "
                "use mode='full' to keep every logit"
            )
        values, indices = z.topk(k, dim=-1)  # (B, ..., C) -> (B, ..., k), descending
        rest = z.double().scatter(-1, indices, float("-inf"))
        tail = torch.logsumexp(rest, dim=-1).float()  # (B, ...)
        out["topk_values.npy"] = store("logits", values)
        out["topk_indices.npy"] = indices.cpu().numpy().astype(np.int16 if c <= np.iinfo(np.int16).max else np.int32)
        out["tail.npy"] = tail.numpy()
        if tail_temperatures:
            # (B, ..., C) -> (B, ..., m): the tail's log-sum-exp at each extra temperature
            out["tail_at.npy"] = torch.stack(
                [torch.logsumexp(rest / t, dim=-1) for t in tail_temperatures], dim=-1).float().numpy()
    taken = set(out)
    for name in features:
        if name not in captured:
            raise ValueError(f"the teacher's layer '{name}' did not run in its forward pass; tap a layer that does")
        fname = feature_file(name, taken)
        taken.add(fname)
        out[fname] = store(f"outputs of layer '{name}'", captured[name])
    return out



def layout_of(rows: dict[str, np.ndarray], features: list[str]) -> dict[str, dict[str, Any]]:
    """``{file: {"role", "dtype", "shape" (per sample), "bytes_per_sample"}}`` from the first batch."""
    roles = {"logits.npy": "logits", "topk_values.npy": "topk_values", "topk_indices.npy": "topk_indices",
             "tail.npy": "tail", "tail_at.npy": "tail_at"}
    feature_names = iter(features)
    layout = {}
    for fname, value in rows.items():
        role = roles.get(fname) or f"feature:{next(feature_names)}"
        layout[fname] = {
            "role": role,
            "dtype": value.dtype.str,
            "shape": list(value.shape[1:]),
            "bytes_per_sample": int(np.prod(value.shape[1:], dtype=np.int64)) * value.dtype.itemsize,
        }
    return layout



def feature_infos(layout: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{layer: {"file", "shape"}}`` of the feature arrays in a layout."""
    return {info["role"].split(":", 1)[1]: {"file": fname, "shape": info["shape"]}
            for fname, info in layout.items() if info["role"].startswith("feature:")}



def topk_to_logits(values: torch.Tensor, indices: torch.Tensor, tail: torch.Tensor, num_classes: int,
                   temperature: float = 1.0) -> torch.Tensor:
    """Rebuild full logits from top-k logits and the tail's log-sum-exp.

    Every class outside the top k gets ``T * (tail - log(C - k))`` where ``tail =
    log(sum_{c not in top-k} exp(z_c / T))``, so at temperature ``T`` the softmax gives the
    top-k classes their exact probabilities and the other classes the tail mass in equal
    shares (see the module docstring for the other temperatures). The fill is kept at most
    ``1e4`` below the smallest top-k logit, so a tail of zero mass stays finite.

    Args:
        values: ``(..., k)`` the k largest logits.
        indices: ``(..., k)`` their classes (int64).
        tail: ``(...)`` log-sum-exp of the other ``C - k`` logits divided by ``temperature``.
        num_classes: ``C``.
        temperature: the temperature ``tail`` was taken at.

    Returns:
        ``(..., C)`` logits, dtype of ``values``.
    """
    k = values.shape[-1]
    fill = temperature * (tail - math.log(num_classes - k))  # (...)
    fill = torch.maximum(fill, values.amin(dim=-1) - _TAIL_FLOOR)
    # (...) -> (..., C), then the k stored logits in their places
    logits = fill.unsqueeze(-1).expand(*fill.shape, num_classes).clone()
    return logits.scatter_(-1, indices, values)



# --------------------------------------------------------------------------- the manifest
def read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        pending = glob.glob(glob.escape(str(path)) + ".tmp-*")
        hint = (f" An unfinished build is at {pending[0]}: run the same TeacherCache.build call to finish it."
                if pending else " Build it first with kdistill.teacher.TeacherCache.build(teacher, x, path).")
        raise CacheError(f"no teacher cache at {path}: the directory does not exist.{hint}")
    f = path / MANIFEST
    if not f.is_file():
        raise CacheError(
            f"{path} is not a finished teacher cache: it has no {MANIFEST} (an interrupted or foreign "
            "directory). Build the cache with TeacherCache.build(teacher, x, path, overwrite=True)."
        )
    try:
        manifest = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CacheError(f"the manifest {f} is unreadable ({type(e).__name__}: {e}); rebuild the cache") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{f} is not a kdistill teacher-cache manifest (no '{FORMAT}' marker); rebuild the cache")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CacheError(
            f"teacher cache {path} has format version {version!r}, this kdistill reads version "
            f"{FORMAT_VERSION}: open it with the kdistill version that wrote it "
            f"({manifest.get('kdistill_version')}) or rebuild it"
        )
    needed = ("num_samples", "num_classes", "mode", "k", "tail_temperatures", "dtype", "files", "teacher",
              "dataset", "features", "bytes_per_sample", "logits_shape")
    missing = [key for key in needed if key not in manifest]
    if missing:
        raise CacheError(f"the manifest {f} lacks {missing}; it is damaged: rebuild the cache")
    _check_consistent(manifest, f)
    return manifest



def _check_consistent(manifest: dict[str, Any], f: Path) -> None:
    """The manifest's numbers agree with each other and with the shapes it records for
    its files (a hand-edited ``num_samples`` would otherwise pass every file checksum).

    Raises:
        CacheError: naming the first disagreement.
    """
    try:
        n, views = int(manifest["num_samples"]), int(manifest.get("views") or 0)
        rows = n * max(views, 1)
        problems = []
        if list(manifest["dataset"].get("shape", [n]))[:1] != [n]:
            problems.append(f"num_samples is {n} but the dataset shape is {manifest['dataset'].get('shape')}")
        if manifest["logits_shape"][-1] != manifest["num_classes"]:
            problems.append(f"num_classes is {manifest['num_classes']} but logits_shape is {manifest['logits_shape']}")
        for fname, info in manifest["files"].items():
            want = [views, n] if info.get("role") == "view_seeds" else [rows]
            if list(info["shape"][:len(want)]) != want:
                problems.append(f"{fname} holds shape {info['shape']}, but num_samples {n} and views {views} "
                                f"call for {want + ['...'] if len(want) == 1 else want}")
    except (KeyError, TypeError, ValueError, IndexError) as e:
        problems = [f"a field is malformed ({type(e).__name__}: {e})"]
    if problems:
        raise CacheError(f"the manifest {f} is inconsistent: {problems[0]}"
                         + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                         + ". It was edited or damaged: rebuild the cache (TeacherCache.build(..., overwrite=True)).")



def manifest_key(manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "format_version": manifest["format_version"],
        "teacher": manifest["teacher"]["fingerprint"],
        "dataset": manifest["dataset"]["fingerprint"],
        "num_samples": manifest["num_samples"],
        "mode": manifest["mode"],
        "k": manifest["k"],
        "tail_temperatures": manifest["tail_temperatures"],
        "dtype": manifest["dtype"],
        "features": sorted(manifest["features"]),
        "views": int(manifest.get("views", 0)),
        "augment": manifest.get("augment"),
        "view_seed": manifest.get("view_seed"),
    }



def key_difference(found: dict[str, Any], wanted: dict[str, Any]) -> str:
    """Which parts of two build keys differ, in words."""
    parts = []
    for name in ("teacher", "dataset", "num_samples", "mode", "k", "tail_temperatures", "dtype", "features",
                 "views", "augment", "view_seed"):
        if found.get(name) != wanted.get(name):
            parts.append(f"{name} ({found.get(name)} there, {wanted.get(name)} asked for)"
                         if name not in ("teacher", "dataset") else f"{name} weights/bytes")
    return ", ".join(parts) or "settings"


def verify_checksums(path: Path, manifest: dict[str, Any]) -> None:
    """Hash every file of the cache at ``path`` and compare with its manifest.

    Raises:
        CacheError: the first file whose SHA-256 differs (the cache is corrupt).
    """
    for fname, info in manifest["files"].items():
        found = file_sha256(path / fname)
        if found != info["sha256"]:
            raise CacheError(
                f"teacher cache {path} is corrupt: the checksum of {fname} is {found[:23]}…, the "
                f"manifest records {info['sha256'][:23]}…. Rebuild the cache "
                "(TeacherCache.build(..., overwrite=True)) or restore an intact copy."
            )


# --------------------------------------------------------------------------- token caches
#: The manifest marker of a top-k token cache (:mod:`kdistill.teacher.token_cache`); it
#: shares the manifest's ``files`` / checksum scheme with the teacher cache above.
TOKEN_FORMAT = "kdistill-token-cache"

#: Version 2: token ids bit-packed to ``ceil(log2 V)`` bits, log-probabilities optionally
#: as low-bit codes (version 1 stored ids as uint8/16/32 and values as floats only).
TOKEN_FORMAT_VERSION = 2

#: 16-bit (or 32-bit) storage of a token cache's log-probabilities (and, with value codes,
#: of each row's range and the tail). numpy has no bfloat16: it is stored as the raw
#: uint16 bit pattern and viewed back as ``torch.bfloat16``.
TOKEN_VALUE_DTYPES = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}

_TORCH_VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def token_id_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer dtype that holds every token id of ``vocab_size``."""
    if vocab_size <= 2**8:
        return np.dtype(np.uint8)
    if vocab_size <= 2**16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


#: With ``value_bits`` or ``curve`` and no ``exact_k`` given, this many of the top
#: log-probabilities of each position are kept in the value dtype (the rest become codes
#: or a curve).
DEFAULT_EXACT_K = 4


def check_token_values(k: int, value_dtype: str, value_bits: Any, exact_k: Any, curve: Any = None) -> int | None:
    """The ``exact_k`` a token cache is built with (``None`` for float values), after
    checking ``value_dtype``, ``value_bits``, ``curve`` and ``exact_k``.

    Raises:
        ValueError: naming the bad argument.
    """
    if value_dtype not in TOKEN_VALUE_DTYPES:
        raise ValueError(f"value_dtype must be one of {sorted(TOKEN_VALUE_DTYPES)}, got {value_dtype!r}")

    def positive_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 1

    from .bitpack import CURVE_TERMS

    if value_bits is not None and curve is not None:
        raise ValueError("value_bits and curve are two encodings of the same values: pass one of them")
    if value_bits is None and curve is None:
        if exact_k is not None:
            raise ValueError("exact_k applies to value codes or a curve only: pass value_bits or curve too, or "
                             "leave exact_k None (then every log-probability is kept in value_dtype)")
        return None
    if value_bits is not None and (not positive_int(value_bits) or value_bits > 16):
        raise ValueError(f"value_bits must be None (values in value_dtype) or an integer in [1, 16], "
                         f"got {value_bits!r}")
    if curve is not None and (not positive_int(curve) or curve > len(CURVE_TERMS)):
        raise ValueError(f"curve must be None or the number of terms of the rank curve, 1 to {len(CURVE_TERMS)}, "
                         f"got {curve!r}")
    if exact_k is None:
        return min(DEFAULT_EXACT_K, k)
    if not positive_int(exact_k) or exact_k > k:
        raise ValueError(f"exact_k must be an integer in [1, k={k}] (the top log-probabilities kept in "
                         f"value_dtype), got {exact_k!r}")
    return exact_k


def token_layout(k: int, vocab_size: int, value_dtype: str, value_bits: int | None = None,
                 exact_k: int | None = None, curve: int | None = None) -> dict[str, dict[str, Any]]:
    """The per-position files of a token cache: ``{file: {"role", "dtype", "shape" (per row)}}``.

    - ``ids.npy``: the ``k`` ids bit-packed to ``ceil(log2 V)`` bits each (uint8 bytes);
    - ``logprobs.npy``: the ``k`` log-probabilities in ``value_dtype``, or with
      ``value_bits`` or ``curve`` only the first ``exact_k`` of them;
    - ``codes.npy`` and ``low.npy`` (``value_bits``, when ``exact_k < k``): the other
      ``k - exact_k`` as ``value_bits``-bit codes, packed, and the low end of their grid
      (``value_dtype``);
    - ``curve.npy`` (``curve``, when ``exact_k < k``): the ``curve`` coefficients of the
      other ``k - exact_k`` (``value_dtype``);
    - ``tail.npy``: the log tail mass, ``value_dtype``.
    """
    from .bitpack import bits_for, packed_bytes

    vdt = np.dtype(TOKEN_VALUE_DTYPES[value_dtype]).str
    u8 = np.dtype(np.uint8).str
    layout = {"ids.npy": {"role": "topk_ids_packed", "dtype": u8, "shape": [packed_bytes(k, bits_for(vocab_size))]}}
    exact = k if exact_k is None else exact_k
    layout["logprobs.npy"] = {"role": "topk_logprobs", "dtype": vdt, "shape": [exact]}
    if exact < k and curve is not None:
        layout["curve.npy"] = {"role": "logprob_curve", "dtype": vdt, "shape": [curve]}
    elif exact < k:
        layout["codes.npy"] = {"role": "topk_logprob_codes", "dtype": u8,
                               "shape": [packed_bytes(k - exact, value_bits)]}
        layout["low.npy"] = {"role": "logprob_code_low", "dtype": vdt, "shape": []}
    layout["tail.npy"] = {"role": "tail_logmass", "dtype": vdt, "shape": []}
    return layout


def token_row_bytes(layout: dict[str, dict[str, Any]]) -> int:
    """Bytes stored per position by the files of :func:`token_layout`."""
    return sum(int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(info["dtype"]).itemsize
               for info in layout.values())


def encode_token_rows(ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor, vocab_size: int,
                      value_dtype: str, value_bits: int | None = None, exact_k: int | None = None,
                      curve: int | None = None) -> dict[str, np.ndarray]:
    """One batch of top-k rows (ids ``(P, k)``, descending log-probabilities ``(P, k)``,
    tail ``(P,)``) as the arrays of :func:`token_layout`."""
    from .bitpack import bits_for, fit_curve, pack_bits, quantize_between

    k = logprobs.shape[-1]
    exact = k if exact_k is None else exact_k
    out = {"ids.npy": pack_bits(ids, bits_for(vocab_size)),
           "logprobs.npy": encode_token_values(logprobs[..., :exact], value_dtype)}
    if exact < k and curve is not None:
        out["curve.npy"] = encode_token_values(fit_curve(logprobs[..., exact:], curve,
                                                         _TORCH_VALUE_DTYPES[value_dtype]), value_dtype)
    elif exact < k:
        top = decode_token_values(out["logprobs.npy"][..., -1], value_dtype)  # the grid starts where stored
        codes, low = quantize_between(logprobs[..., exact:], top, value_bits, _TORCH_VALUE_DTYPES[value_dtype])
        out["codes.npy"] = pack_bits(codes, value_bits)
        out["low.npy"] = encode_token_values(low, value_dtype)
    out["tail.npy"] = encode_token_values(tail, value_dtype)
    return out


def decode_token_rows(arrays: dict[str, np.ndarray], rows: np.ndarray, k: int, vocab_size: int,
                      value_dtype: str, value_bits: int | None = None, exact_k: int | None = None,
                      curve: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows ``rows`` of a token cache's arrays -> ``(ids (R, k) int64, logprobs (R, k)
    float32, tail (R,) float32)`` (inverse of :func:`encode_token_rows`)."""
    from .bitpack import bits_for, dequantize_between, eval_curve, unpack_bits

    ids = torch.from_numpy(unpack_bits(np.asarray(arrays["ids.npy"][rows]), bits_for(vocab_size), k))
    lp = decode_token_values(arrays["logprobs.npy"][rows], value_dtype)
    exact = k if exact_k is None else exact_k
    if exact < k and curve is not None:
        lp = torch.cat([lp, eval_curve(decode_token_values(arrays["curve.npy"][rows], value_dtype), k - exact)], 1)
    elif exact < k:
        codes = unpack_bits(np.asarray(arrays["codes.npy"][rows]), value_bits, k - exact)
        low = decode_token_values(arrays["low.npy"][rows], value_dtype)
        lp = torch.cat([lp, dequantize_between(codes, lp[:, -1], low, value_bits)], dim=1)
    return ids, lp, decode_token_values(arrays["tail.npy"][rows], value_dtype)


def token_data_fingerprint(tokens: torch.Tensor, offsets: torch.Tensor, trained: torch.Tensor) -> str:
    """SHA-256 of a token dataset: its flat tokens (as int32), offsets (int64) and trained
    mask (bool), each with its length.

    Returns:
        ``"sha256:<hex>"``; equal for two datasets exactly when their sequences and masks are.
    """
    h = hashlib.sha256()
    for name, t in (("tokens", tokens.to(torch.int32)), ("offsets", offsets.to(torch.int64)),
                    ("trained", trained.to(torch.bool))):
        h.update(f"{name}|{t.numel()}\n".encode())
        h.update(_tensor_bytes(t))
    return "sha256:" + h.hexdigest()


def encode_token_values(t: torch.Tensor, value_dtype: str) -> np.ndarray:
    """Log-probabilities as stored: float16 / float32 arrays, or bfloat16 bit patterns (uint16)."""
    if value_dtype == "bfloat16":
        return t.detach().to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)
    return t.detach().float().cpu().numpy().astype(TOKEN_VALUE_DTYPES[value_dtype])


def decode_token_values(a: np.ndarray, value_dtype: str) -> torch.Tensor:
    """Stored values back as a float32 tensor (inverse of :func:`encode_token_values`)."""
    a = np.ascontiguousarray(a)
    if value_dtype == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(a).float()


def read_token_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a token cache, checked for its marker, version and fields.

    Raises:
        CacheError: no directory or manifest, another format, another version, a field missing.
    """
    f = Path(path) / MANIFEST
    if not f.is_file():
        pending = glob.glob(glob.escape(str(path)) + ".tmp-*")
        hint = (f" An unfinished build is at {pending[0]}: run the same TokenCache.build call to finish it."
                if pending else " Build it first with kdistill.teacher.TokenCache.build(teacher, dataset, path).")
        raise CacheError(f"no token cache at {path}: {MANIFEST} is missing." + hint)
    try:
        manifest = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CacheError(f"the manifest {f} is unreadable ({type(e).__name__}: {e}); rebuild the cache") from e
    if not isinstance(manifest, dict) or manifest.get("format") != TOKEN_FORMAT:
        raise CacheError(f"{f} is not a kdistill token-cache manifest (no '{TOKEN_FORMAT}' marker); "
                         "a TeacherCache is opened with TeacherCache.open")
    if manifest.get("format_version") != TOKEN_FORMAT_VERSION:
        raise CacheError(f"token cache {path} has format version {manifest.get('format_version')!r}, this kdistill "
                         f"reads version {TOKEN_FORMAT_VERSION} (bit-packed ids, optional value codes): rebuild it "
                         "(TokenCache.build(..., overwrite=True))")
    needed = ("teacher", "dataset", "vocab_size", "k", "value_dtype", "value_bits", "curve", "exact_k", "id_bits",
              "num_sequences", "num_positions", "bytes_per_position", "files")
    missing = [key for key in needed if key not in manifest]
    if missing:
        raise CacheError(f"the manifest {f} lacks {missing}; it is damaged: rebuild the cache")
    return manifest
