"""Bit packing and low-bit value codes of the top-k token cache.

Every function works on whole ``(P, n)`` arrays at once (no Python loop over rows), and
keeps rows independent: row ``p`` of a packed array holds row ``p`` of the input and
nothing else, so a memory-mapped packed file is still addressed row by row.

- :func:`pack_bits` / :func:`unpack_bits`: ``n`` unsigned integers of ``bits`` bits each
  into ``ceil(n * bits / 8)`` bytes, least significant bit first (value ``j`` starts at
  bit ``j * bits`` of the row).
- :func:`quantize_between` / :func:`dequantize_between`: descending log-probabilities as
  ``bits``-bit codes on a per-row linear grid from a value kept exactly (the last of the
  row's exact top ones) down to the row's smallest value (stored at 16 or 32 bits).
- :func:`fit_curve` / :func:`eval_curve`: descending log-probabilities as the few
  coefficients of a least-squares curve in their rank (an orthonormal basis of ``1``,
  ``sqrt(x)``, ``x``, ``log(1 + t)``, ``x^2``, ...), stored at 16 or 32 bits.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

#: The widest field :func:`pack_bits` handles (token ids up to ``2**32``, value codes).
MAX_BITS = 32


def bits_for(count: int) -> int:
    """Bits that hold every integer in ``[0, count)``: ``ceil(log2 count)``, at least 1
    (``bits_for(2048) == 11``, ``bits_for(151936) == 18``)."""
    if not isinstance(count, (int, np.integer)) or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    return max(1, (int(count) - 1).bit_length())


def packed_bytes(n: int, bits: int) -> int:
    """Bytes of one packed row of ``n`` fields of ``bits`` bits."""
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> int:
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer in [1, {MAX_BITS}], got {bits!r}")
    return int(bits)


def pack_bits(values: np.ndarray | torch.Tensor, bits: int) -> np.ndarray:
    """``(P, n)`` non-negative integers below ``2**bits`` -> ``(P, ceil(n * bits / 8))`` uint8.

    Raises:
        ValueError: a value out of ``[0, 2**bits)``, or ``bits`` out of ``[1, 32]``.
    """
    bits = _check_bits(bits)
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    v = np.asarray(values)
    if v.ndim != 2:
        raise ValueError(f"values must be a (P, n) array, got shape {v.shape}")
    v = v.astype(np.int64, copy=False)
    if v.size and (int(v.min()) < 0 or int(v.max()) >= 1 << bits):
        raise ValueError(f"values must lie in [0, {1 << bits}) to fit {bits} bits, "
                         f"got [{int(v.min())}, {int(v.max())}]")
    p, n = v.shape
    # (P, n) -> (P, n, bits) single bits, least significant first -> (P, n * bits) -> bytes
    planes = ((v[..., None] >> np.arange(bits, dtype=np.int64)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(p, n * bits), axis=-1, bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``(P, ceil(n * bits / 8))`` uint8 -> ``(P, n)`` int64.

    Each field is read with one gather of the 8 bytes from its first one, viewed as a
    little-endian uint64, shifted and masked (a field of up to 32 bits starting at any bit
    of a byte spans at most 5 bytes).
    """
    bits = _check_bits(bits)
    packed = np.asarray(packed)
    if packed.ndim != 2 or packed.shape[1] != packed_bytes(n, bits):
        raise ValueError(f"packed must be a (P, {packed_bytes(n, bits)}) uint8 array for {n} fields of {bits} bits, "
                         f"got shape {packed.shape}")
    p = packed.shape[0]
    start = np.arange(n, dtype=np.int64) * bits
    padded = np.zeros((p, packed.shape[1] + 8), dtype=np.uint8)
    padded[:, :packed.shape[1]] = packed
    # (P, n, 8) bytes from each field's first byte, as one little-endian uint64 per field
    window = padded[:, (start // 8)[:, None] + np.arange(8)]
    words = np.ascontiguousarray(window).view("<u8")[..., 0]
    return ((words >> (start % 8).astype(np.uint64)) & np.uint64((1 << bits) - 1)).astype(np.int64)


# --------------------------------------------------------------------------- value codes
def _rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).double()


def quantize_between(values: torch.Tensor, top: torch.Tensor, bits: int,
                     low_dtype: torch.dtype = torch.float16) -> tuple[np.ndarray, torch.Tensor]:
    """Descending ``(P, n)`` log-probabilities at or below ``top`` ``(P,)`` as ``bits``-bit codes.

    Per row the grid runs from ``top`` (given, already stored: the last value kept exactly)
    down to ``low``, the row's smallest value rounded to ``low_dtype`` (stored too), in
    ``2**bits - 1`` equal steps ``step = (top - low) / (2**bits - 1)``. Value ``v`` gets the
    code ``c = round((top - v) / step)`` clamped to ``[0, 2**bits - 1]`` and decodes to
    ``top - c * step``: within ``step / 2`` of ``v``, plus the rounding of ``top`` and
    ``low`` for values beyond them (:func:`max_quantization_error`). Values below ``-6e4``
    (``-inf`` included: a token the teacher gave no mass) count as ``-6e4``.

    Returns:
        ``codes`` ``(P, n)`` uint32 (pack them with :func:`pack_bits`) and ``low`` ``(P,)``
        in ``low_dtype``.
    """
    bits = _check_bits(bits)
    if bits > 16:
        raise ValueError(f"value codes take at most 16 bits, got {bits}")
    v = values.detach().double().cpu().clamp(min=-6e4)
    top = top.detach().double().cpu().clamp(min=-6e4)
    levels = (1 << bits) - 1
    low = _rounded(v.amin(dim=-1), low_dtype) if v.shape[-1] else top.clone()
    step = ((top - low) / levels).unsqueeze(-1)
    codes = torch.where(step > 0, torch.round((top.unsqueeze(-1) - v) / step.clamp(min=1e-300)),
                        torch.zeros_like(v))
    codes = codes.clamp(0, levels).to(torch.int64)
    return codes.numpy().astype(np.uint32), low.to(low_dtype)


def dequantize_between(codes: np.ndarray | torch.Tensor, top: torch.Tensor, low: torch.Tensor,
                       bits: int) -> torch.Tensor:
    """``(P, n)`` codes of :func:`quantize_between` and their ``(P,)`` grid ends -> ``(P, n)``
    float32 values."""
    codes = torch.as_tensor(codes)
    top, low = top.double().unsqueeze(-1), low.double().unsqueeze(-1)
    return (top - codes.double() * ((top - low) / ((1 << bits) - 1))).float()


def max_quantization_error(top: torch.Tensor, low: torch.Tensor, bits: int,
                           dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The bound on :func:`quantize_between`'s error per row: ``step / 2`` plus the larger
    rounding of ``top`` or the row's smallest value to ``dtype`` (half a unit in the last
    place: at most ``|x| * eps / 2``, or half the smallest subnormal step near 0)."""
    top, low = top.double(), low.double()
    info = torch.finfo(dtype)
    rounding = torch.maximum(top.abs(), low.abs()) * info.eps / 2 + info.smallest_normal * info.eps
    return (top - low) / ((1 << bits) - 1) / 2 + rounding


# --------------------------------------------------------------------------- rank curves
#: The functions of the rank a curve is fitted with, in the order they are taken (a curve of
#: ``m`` terms uses the first ``m``), of ``t = 0 .. n-1`` (the rank among the ``n`` values
#: fitted), ``x = t / (n - 1)``.
CURVE_TERMS = ("1", "sqrt(x)", "x", "log1p(t)/log(n)", "x^2", "x^3", "x^4")

#: Values below this count as it when fitted (a token the teacher gave no mass, ``-inf``).
CURVE_FLOOR = -1e3


@functools.lru_cache(maxsize=64)
def _curve_basis(n: int, terms: int) -> np.ndarray:
    t = np.arange(n, dtype=np.float64)
    x = t / max(n - 1, 1)
    cols = {"1": np.ones(n), "sqrt(x)": np.sqrt(x), "x": x, "log1p(t)/log(n)": np.log1p(t) / math.log(max(n, 2)),
            "x^2": x ** 2, "x^3": x ** 3, "x^4": x ** 4}
    basis = np.zeros((n, terms))
    for j, name in enumerate(CURVE_TERMS[:terms]):
        v = cols[name].copy()
        norm0 = np.linalg.norm(v)
        for _ in range(2):  # Gram-Schmidt, twice for round-off
            v -= basis[:, :j] @ (basis[:, :j].T @ v)
        norm = np.linalg.norm(v)
        if norm > 1e-9 * max(norm0, 1.0):
            basis[:, j] = v / norm  # else: dependent on the ones before (few values), left zero
    basis.setflags(write=False)
    return basis


def curve_basis(n: int, terms: int) -> torch.Tensor:
    """``(n, terms)`` float64: the first ``terms`` of :data:`CURVE_TERMS` over ``n`` ranks,
    made orthonormal by Gram-Schmidt in that order (a column that depends on the ones before
    it, when ``n`` is small, is zero). Deterministic: plain float64 arithmetic, no LAPACK."""
    if not 1 <= terms <= len(CURVE_TERMS):
        raise ValueError(f"a curve takes 1 to {len(CURVE_TERMS)} terms, got {terms!r}")
    return torch.from_numpy(np.array(_curve_basis(int(n), int(terms))))


def fit_curve(values: torch.Tensor, terms: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Descending ``(P, n)`` log-probabilities -> ``(P, terms)`` coefficients in ``dtype``:
    the least-squares fit of each row on :func:`curve_basis` (its projection on the
    orthonormal columns, so the coefficients are of the size of the values and round to
    16 bits without cancellation). Values below :data:`CURVE_FLOOR` count as it."""
    v = values.detach().double().cpu().clamp(min=CURVE_FLOOR)
    return (v @ curve_basis(v.shape[-1], terms)).to(dtype)


def eval_curve(coefficients: torch.Tensor, n: int) -> torch.Tensor:
    """``(P, terms)`` coefficients of :func:`fit_curve` -> the ``(P, n)`` float32 values."""
    c = coefficients.double()
    return (c @ curve_basis(n, c.shape[-1]).T).float()


__all__ = ["MAX_BITS", "bits_for", "packed_bytes", "pack_bits", "unpack_bits", "quantize_between",
           "dequantize_between", "max_quantization_error", "CURVE_TERMS", "CURVE_FLOOR", "curve_basis", "fit_curve",
           "eval_curve"]
