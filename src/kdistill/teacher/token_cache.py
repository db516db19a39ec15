"""An offline top-k token cache for language-model teachers: :class:`TokenCache`.

:meth:`TokenCache.build` runs a causal language model once over every sequence of a
:class:`~kdistill.data.text.TokenDataset` and stores, for each trained-on position (where
the next-token target is ``>= 0``), the teacher's ``k`` most likely next tokens, their
log-probabilities at ``T = 1`` and the log of the remaining (tail) mass. :meth:`TokenCache.open`
maps the files back as a :class:`~kdistill.teacher.Teacher`: given a token batch (its
``batch.index`` names the sequences), it returns ``Outputs(topk=TopKLogits(...))``: the
stored entries as ``k`` logits and one fill logit per position, which the token losses
read sparsely and any other loss reads as dense ``(B, T, V)`` logits built on first use.

Layout of a cache directory (``P`` stored positions, ``N`` sequences)::

    path/
      manifest.json    fingerprints, vocab size, k, encodings, counts, a checksum of every file
      ids.npy          (P, ceil(k * b / 8)) uint8: the k token ids bit-packed, b = ceil(log2 V)
      logprobs.npy     (P, k) their log-probabilities at T=1, descending (float16,
                       bfloat16 as raw uint16 bits, or float32); with ``value_bits``:
                       or ``curve``: (P, exact_k), the first exact_k of them
      codes.npy        (P, ceil((k - exact_k) * value_bits / 8)) uint8, ``value_bits`` only:
                       the other log-probabilities as value_bits-bit codes, bit-packed
      low.npy          (P,) ``value_bits`` only: the low end of the codes' grid (value dtype)
      curve.npy        (P, curve) ``curve`` only: the coefficients of a least-squares curve in
                       the rank through the other log-probabilities (value dtype)
      tail.npy         (P,) log(1 - sum of the k probabilities), value dtype (-inf: no tail)
      offsets.npy      (N + 1,) int64: sequence i's positions are rows offsets[i]:offsets[i+1]
      lengths.npy      (N,) int32: sequence i's length in tokens (checked at serving)

Building reuses the teacher cache's machinery (:mod:`kdistill.teacher.cache.build`): a
temporary directory renamed into place once complete, a lock per path, ``progress.json``
committed every few seconds and when the build fails, adopted by the next build of the same
teacher, data and settings.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from ..outputs import Batch, Outputs, TopKLogits
from .base import Teacher
from .cache.build import COMMIT_INTERVAL_S, _build_lock, _claim_temp, _commit, _publish
from .cache.bitpack import CURVE_TERMS, bits_for
from .cache.format import (MANIFEST, TOKEN_FORMAT, TOKEN_FORMAT_VERSION, CacheError, CacheMismatchError,
                           check_token_values, decode_token_rows, encode_token_rows, file_sha256, read_token_manifest,
                           teacher_fingerprint, teacher_module, token_data_fingerprint, token_layout, token_row_bytes,
                           verify_checksums)

#: How the rebuilt distribution treats the mass outside the stored top k.
TAIL_MODES = ("renormalize", "bucket", "uniform")

#: Rebuilt logits of tokens that get no mass lie this far below the smallest stored one
#: (finite, so a KL never meets ``0 * inf``).
_FLOOR = 1e4

#: ``TokenCache.open(in_memory=None)`` reads caches up to this size into RAM.
IN_MEMORY_BYTES = 256 * 2**20


def trained_positions(dataset: Any) -> torch.Tensor:
    """``(num_tokens,)`` bool: the flat positions whose next-token target is trained on
    (token ``t + 1`` of the same sequence exists and is trained on), in dataset order."""
    trained = dataset.trained
    nxt = torch.zeros_like(trained)
    nxt[:-1] = trained[1:]
    last = dataset.offsets[1:] - 1  # the last token of each sequence predicts nothing
    nxt[last] = False
    return nxt


def _check_k(k: Any, vocab: int | None = None) -> int:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer (tokens kept per position), got {k!r}")
    if vocab is not None and k > vocab:
        raise ValueError(f"k={k} exceeds the teacher's vocabulary of {vocab} tokens")
    return k


def _check_tail(tail: str) -> str:
    if tail not in TAIL_MODES:
        raise ValueError(f"tail must be one of {TAIL_MODES}, got {tail!r}")
    return tail


def _fill_and_values(logprobs: torch.Tensor, tail: torch.Tensor, vocab_size: int,
                     mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The logit of every token outside the top k ``(...)`` and of the top k ``(..., k)``."""
    logprobs = logprobs.float()
    tail = tail.float()
    k = logprobs.shape[-1]
    floor = logprobs.amin(dim=-1) - _FLOOR  # (...)
    if mode == "uniform":
        m = tail.exp().clamp(max=1.0)
        spread = torch.where(m > 0, tail - math.log(vocab_size), floor)  # log(m / V)
        return spread, torch.logaddexp(logprobs, spread.unsqueeze(-1))
    if mode == "bucket" and vocab_size > k:
        return torch.maximum(tail - math.log(vocab_size - k), floor), logprobs
    return floor, logprobs  # renormalize (or nothing outside the top k)


def rebuild_logits(ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor, vocab_size: int,
                   mode: str = "bucket") -> torch.Tensor:
    """Full-vocabulary logits from stored top-k entries.

    Args:
        ids: ``(..., k)`` token ids (int64).
        logprobs: ``(..., k)`` their log-probabilities at ``T = 1``.
        tail: ``(...)`` log of the mass outside the top k (``-inf``: none).
        vocab_size: ``V``.
        mode: ``"renormalize"``: the other ``V - k`` tokens get no mass (the top k
            renormalised; their logits lie ``1e4`` below the smallest stored one);
            ``"bucket"``: they share the tail mass equally (each gets ``tail - log(V - k)``);
            ``"uniform"``: the tail mass is spread over all ``V`` tokens, the top k
            included (``q = p_topk + m / V``, ``m / V`` elsewhere).

    Returns:
        ``(..., V)`` float32 logits whose softmax at ``T = 1`` is the rebuilt distribution.
    """
    fill, values = _fill_and_values(logprobs, tail, vocab_size, _check_tail(mode))
    logits = fill.unsqueeze(-1).expand(*fill.shape, vocab_size).clone()
    return logits.scatter_(-1, ids, values)


def encode_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(P, V)`` logits -> top-k ids ``(P, k)``, their log-probabilities ``(P, k)`` and the
    log tail mass ``(P,)``, computed in float64 (the tail as a log-sum-exp of the other
    tokens' log-probabilities, not as ``log(1 - sum)``, which cancels)."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    values, ids = lp.topk(k, dim=-1)
    if k < lp.shape[-1]:
        tail = torch.logsumexp(lp.scatter(-1, ids, float("-inf")), dim=-1)
    else:
        tail = torch.full(lp.shape[:-1], float("-inf"), dtype=torch.float64)
    return ids, values, tail


class TokenCache(Teacher):
    """A top-k token cache on disk, served as a teacher (no forward pass at all).

    Sequence ``batch.index[i]`` of the cache gives row ``i`` of a token batch its teacher
    distribution at every trained-on position; ``__call__`` returns it sparsely
    (:class:`~kdistill.outputs.TopKLogits`: ``k`` logits and one fill logit per trained-on
    position, with the tail mode chosen at :meth:`open`); ``outputs.logits`` builds the
    dense ``(B, T, V)`` float32 logits (zeros where not trained on) when a loss asks.

    Attributes:
        path: the cache directory.
        manifest: the parsed ``manifest.json``.
        tail: the tail mode (:data:`TAIL_MODES`).
    """

    def __init__(self, path: Path, manifest: dict[str, Any], arrays: dict[str, np.ndarray], tail: str):
        self.path = Path(path)
        self.manifest = manifest
        self.tail = _check_tail(tail)
        self._arrays = arrays
        self._offsets = torch.from_numpy(np.asarray(arrays["offsets.npy"], dtype=np.int64))
        self._lengths = torch.from_numpy(np.asarray(arrays["lengths.npy"], dtype=np.int64))
        self.temperatures: list[float] = [1.0]

    # ------------------------------------------------------------------ properties
    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def k(self) -> int:
        return int(self.manifest["k"])

    @property
    def num_sequences(self) -> int:
        return int(self.manifest["num_sequences"])

    @property
    def num_positions(self) -> int:
        return int(self.manifest["num_positions"])

    @property
    def bytes_per_position(self) -> float:
        """Bytes stored per trained-on position (packed ids, values or codes and their
        range, tail; the per-sequence offsets and lengths and the ``.npy`` headers excluded)."""
        return float(self.manifest["bytes_per_position"])

    def __repr__(self) -> str:
        return (f"TokenCache({str(self.path)!r}, k={self.k}, vocab_size={self.vocab_size}, tail={self.tail!r}, "
                f"{self.num_positions} positions)")

    # ------------------------------------------------------------------ build
    @classmethod
    def build(cls, teacher_model: nn.Module, dataset: Any, path: str | os.PathLike, *, k: int = 64,
              value_dtype: str = "float16", value_bits: int | None = None, curve: int | None = None,
              exact_k: int | None = None, batch_size: int = 16, tail: str = "bucket",
              device: str | torch.device | None = None, overwrite: bool = False,
              resume: bool = True) -> "TokenCache":
        """Run ``teacher_model`` over every sequence of ``dataset`` and store its top-k
        next-token distribution at each trained-on position.

        The teacher runs as a Distiller runs it (a :class:`~kdistill.teacher.LiveTeacher`:
        eval mode, inference mode) on batches of ``batch_size`` consecutive sequences,
        padded on the right; its flags are restored afterwards. An existing cache of the
        same teacher, data and settings at ``path`` is opened instead of rebuilt; an
        interrupted build of them is resumed from its last committed sequence.

        Args:
            teacher_model: a causal LM mapping ``input_ids``/``attention_mask`` to
                ``(B, T, V)`` logits (a Hugging Face model or a ``LiveTeacher``).
            dataset: the :class:`~kdistill.data.text.TokenDataset` (in training order of
                indices: ``batch.index`` is the sequence).
            path: the cache directory to create.
            k: tokens kept per position, ``1 <= k <= V``.
            value_dtype: ``"float16"``, ``"bfloat16"`` or ``"float32"`` for the
                log-probabilities and the tail (with ``value_bits``: for each row's range
                and the tail).
            value_bits: ``None`` (default): every log-probability is stored in
                ``value_dtype``. An integer ``1..16``: the top ``exact_k`` are, and the
                other ``k - exact_k`` are stored as ``value_bits``-bit codes on a linear
                grid from the last exact one down to the row's smallest value
                (:func:`~kdistill.teacher.cache.bitpack.quantize_between`: each within half
                a grid step). Token ids are always bit-packed to ``ceil(log2 V)`` bits.
            curve: ``None`` (default), or an integer ``1..7``: the top ``exact_k``
                log-probabilities are stored in ``value_dtype`` and the other ``k - exact_k``
                as the ``curve`` coefficients (``value_dtype``) of their least-squares fit in
                the rank (:func:`~kdistill.teacher.cache.bitpack.fit_curve`; sorted
                log-probabilities lie on a smooth curve, so 4 to 6 terms rebuild them
                closely: see ``docs/token_cache.md``). Not together with ``value_bits``.
            exact_k: with ``value_bits`` or ``curve``, how many of the top log-probabilities
                are kept in ``value_dtype`` (``1 <= exact_k <= k``; default ``min(4, k)``).
            batch_size: sequences per teacher forward.
            tail: the tail mode the returned cache serves with (not stored; any mode can
                be chosen at :meth:`open`).
            device: where the teacher runs (default: where its parameters are).
            overwrite: replace a cache of another teacher, data or settings at ``path``.
            resume: continue an interrupted build of the same teacher, data and settings.

        Raises:
            ValueError: a bad ``k``, ``value_dtype``, ``value_bits``, ``curve``, ``exact_k`` or
                ``batch_size``; NaN logits.
            CacheMismatchError: ``path`` holds another cache and ``overwrite`` is false.
        """
        _check_k(k)
        _check_tail(tail)
        exact_k = check_token_values(k, value_dtype, value_bits, exact_k, curve)
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        path = Path(path)
        with _build_lock(path):
            _build(teacher_model, dataset, path, k=k, value_dtype=value_dtype, value_bits=value_bits,
                   curve=curve, exact_k=exact_k, batch_size=batch_size,
                   device=device, overwrite=overwrite, resume=resume)
        return cls.open(path, tail=tail, verify=False)

    # ------------------------------------------------------------------ open
    @classmethod
    def open(cls, path: str | os.PathLike, *, tail: str = "bucket", teacher: nn.Module | None = None,
             dataset: Any = None, verify: bool = True, in_memory: bool | None = None) -> "TokenCache":
        """Open a finished token cache (memory-mapped, or in RAM when small), after checking it.

        Args:
            path: the cache directory.
            tail: ``"renormalize"``, ``"bucket"`` (default) or ``"uniform"``
                (:func:`rebuild_logits`).
            teacher: the network the cache should come from (fingerprint checked).
            dataset: the token dataset it should have been built on (fingerprint checked).
            verify: hash every file and compare with the manifest.
            in_memory: read the arrays into RAM (``None``: when at most :data:`IN_MEMORY_BYTES`).

        Raises:
            CacheError: missing/foreign manifest, a missing, truncated or corrupt file
                (the message names the file and the check).
            CacheMismatchError: built from another teacher or other data.
        """
        _check_tail(tail)
        path = Path(path)
        manifest = read_token_manifest(path)
        total = sum(int(info["bytes"]) for info in manifest["files"].values())
        if in_memory is None:
            in_memory = total <= IN_MEMORY_BYTES
        arrays: dict[str, np.ndarray] = {}
        for fname, info in manifest["files"].items():
            f = path / fname
            if not f.is_file():
                raise CacheError(f"token cache {path} is incomplete: {fname} is missing (the manifest lists it); "
                                 "rebuild it (TokenCache.build(..., overwrite=True))")
            if f.stat().st_size != info["bytes"]:
                raise CacheError(f"token cache {path} is truncated or damaged: {fname} has {f.stat().st_size} bytes, "
                                 f"the manifest expects {info['bytes']}; rebuild it")
            try:
                mm = np.load(f, mmap_mode=None if in_memory else "r", allow_pickle=False)
            except Exception as e:
                raise CacheError(f"token cache {path}: {fname} is not a readable .npy file "
                                 f"({type(e).__name__}: {e}); rebuild it") from e
            if list(mm.shape) != list(info["shape"]) or mm.dtype.str != info["dtype"]:
                raise CacheError(f"token cache {path}: {fname} holds a {list(mm.shape)} {mm.dtype.str} array, "
                                 f"the manifest expects {info['shape']} {info['dtype']}; rebuild it")
            arrays[fname] = mm
        if teacher is not None:
            found = teacher_fingerprint(teacher_module(teacher))
            if found != manifest["teacher"]["fingerprint"]:
                raise CacheMismatchError(
                    f"token cache {path} was built from another teacher: teacher fingerprint check failed "
                    f"(cache {manifest['teacher']['fingerprint'][:23]}…, given {found[:23]}…); "
                    "rebuild it (TokenCache.build(..., overwrite=True))")
        if dataset is not None:
            found = _data_fingerprint(dataset)
            if found != manifest["dataset"]["fingerprint"]:
                raise CacheMismatchError(
                    f"token cache {path} was built from other data: data fingerprint check failed "
                    f"(cache {manifest['dataset']['fingerprint'][:23]}…, given {found[:23]}…; "
                    f"{manifest['num_sequences']} sequences there, {len(dataset)} given)")
        if verify:
            try:
                verify_checksums(path, manifest)
            except CacheError as e:
                raise CacheError(f"checksum check failed: {e}".replace("teacher cache", "token cache")
                                 .replace("TeacherCache.build", "TokenCache.build")) from None
        return cls(path, manifest, arrays, tail)

    def with_tail(self, tail: str) -> "TokenCache":
        """The same cache served with another tail mode (arrays shared)."""
        return type(self)(self.path, self.manifest, self._arrays, tail)

    # ------------------------------------------------------------------ protocol
    def set_temperatures(self, temperatures: Iterable[float]) -> None:
        """Recorded only: the losses divide the served logits by ``T`` themselves. At
        ``T != 1`` the top-k ratios are exact; the tail is approximate (see the docs)."""
        temps = [float(t) for t in temperatures]
        if not all(0 < t < math.inf for t in temps):
            raise ValueError(f"temperatures must be positive and finite, got {temps}")
        self.temperatures = temps or [1.0]

    def lookup(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stored rows of sequences ``index``: ``(ids (P, k) int64, logprobs (P, k)
        float32, tail (P,) float32, counts (B,))``, positions in sequence order.

        Raises:
            CacheMismatchError: an index out of range.
        """
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1).cpu()
        n = self.num_sequences
        if index.numel() and bool(((index < 0) | (index >= n)).any()):
            bad = index[(index < 0) | (index >= n)].tolist()
            raise CacheMismatchError(f"token cache {self.path}: index range check failed: batch.index holds "
                                     f"{bad[:5]} but the cache holds sequences 0..{n - 1}; the loader must be "
                                     "over the dataset the cache was built on")
        starts = self._offsets[index]
        counts = self._offsets[index + 1] - starts
        total = int(counts.sum())
        within = torch.arange(total) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        rows = (torch.repeat_interleave(starts, counts) + within).numpy()
        m = self.manifest
        ids, lp, tail = decode_token_rows(self._arrays, rows, self.k, self.vocab_size, m["value_dtype"],
                                          m["value_bits"], m["exact_k"], m["curve"])
        return ids, lp, tail, counts

    def __call__(self, batch: Batch) -> Outputs:
        if batch.index is None:
            raise CacheMismatchError("a TokenCache needs batch.index (the sequences' indices in the dataset it was "
                                     "built on); TokenDataset.loader provides it")
        if not batch.is_tokens:
            raise CacheMismatchError("a TokenCache serves token batches ((B, T) next-token targets)")
        index = batch.index.reshape(-1).cpu().long()
        ids, lp, tail, counts = self.lookup(index)
        mask = batch.token_mask
        device = mask.device
        inputs = batch.inputs
        if isinstance(inputs, dict) and "attention_mask" in inputs:
            lengths = inputs["attention_mask"].sum(1).cpu()
        else:
            lengths = None
        stored = self._lengths[index]
        if lengths is not None and not torch.equal(lengths.long(), stored):
            i = int(torch.nonzero(lengths.long() != stored)[0])
            raise CacheMismatchError(
                f"token cache {self.path}: sequence length check failed: sequence {int(index[i])} has "
                f"{int(lengths[i])} tokens in the batch, {int(stored[i])} in the cache")
        found = mask.sum(1).cpu()
        if not torch.equal(found.long(), counts):
            i = int(torch.nonzero(found.long() != counts)[0])
            raise CacheMismatchError(
                f"token cache {self.path}: trained-position check failed: sequence {int(index[i])} has "
                f"{int(found[i])} trained-on positions in the batch, {int(counts[i])} in the cache")
        fill, values = _fill_and_values(lp.to(device), tail.to(device), self.vocab_size, self.tail)
        # sparse: k logits and one fill per trained-on position; token losses read it as it
        # is, any other loss gets the dense (B, T, V) logits built on first use
        return Outputs(topk=TopKLogits(ids=ids.to(device), values=values, fill=fill, positions=mask,
                                       vocab_size=self.vocab_size))


def _data_fingerprint(dataset: Any) -> str:
    return token_data_fingerprint(dataset.tokens, dataset.offsets, dataset.trained)


def _build(teacher_model: nn.Module, dataset: Any, path: Path, *, k: int, value_dtype: str,
           value_bits: int | None, curve: int | None, exact_k: int | None, batch_size: int, device: Any,
           overwrite: bool, resume: bool) -> None:
    from .live import LiveTeacher
    from ..runtime import get_device

    module = teacher_module(teacher_model)
    n = len(dataset)
    positions = trained_positions(dataset)
    # per sequence: how many positions are stored; (N + 1,) row offsets into the arrays
    cs = torch.zeros(positions.numel() + 1, dtype=torch.long)
    torch.cumsum(positions.long(), 0, out=cs[1:])
    counts = cs[dataset.offsets[1:]] - cs[dataset.offsets[:-1]]
    offsets = torch.zeros(n + 1, dtype=torch.long)
    torch.cumsum(counts.long(), 0, out=offsets[1:])
    total = int(offsets[-1])
    if device is None:
        dev = next((p.device for p in module.parameters()), torch.device("cpu"))
    else:
        dev = get_device(device)
    key = {
        "format": TOKEN_FORMAT,
        "format_version": TOKEN_FORMAT_VERSION,
        "teacher": teacher_fingerprint(module),
        "dataset": _data_fingerprint(dataset),
        "num_sequences": n,
        "k": k,
        "value_dtype": value_dtype,
        "value_bits": value_bits,
        "curve": curve,
        "exact_k": exact_k,
    }

    # an existing cache: the same one is kept, another needs overwrite
    replace = False
    if path.exists():
        if (path / MANIFEST).is_file():
            try:
                m = read_token_manifest(path)
                same = {name: m.get(name) if name not in ("teacher", "dataset") else m[name]["fingerprint"]
                        for name in key} == key
                if same:
                    verify_checksums(path, m)
                    return
            except CacheError:
                if not overwrite:
                    raise
            else:
                if not overwrite:
                    diff = [name for name in key
                            if (m.get(name) if name not in ("teacher", "dataset") else m[name]["fingerprint"])
                            != key[name]]
                    raise CacheMismatchError(f"{path} already holds a token cache of other {', '.join(diff)}; pass "
                                             "overwrite=True to replace it, or build into another path")
            replace = True
        elif path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        else:
            raise FileExistsError(f"cannot build a token cache at {path}: it exists and holds no {MANIFEST}")

    tmp, progress = _claim_temp(path, key, resume)
    vocab = None
    arrays: dict[str, np.ndarray] | None = None
    done = 0
    if progress is not None:
        arrays = _reopen(tmp, progress, total, k)
        if arrays is None:
            shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        else:
            done, vocab = int(progress["rows_done"]), int(progress["logits_shape"][-1])
    layout: dict[str, Any] = {} if arrays is None else progress["layout"]

    was_training = module.training
    grad_flags = [p.requires_grad for p in module.parameters()]
    live = teacher_model if isinstance(teacher_model, LiveTeacher) else LiveTeacher(module, dev)
    last_commit, committed = time.monotonic(), done
    try:
        with torch.inference_mode():
            while done < n:
                stop = min(n, done + batch_size)
                batch = dataset.collate(torch.arange(done, stop)).to(dev)
                logits = live(batch).logits
                if torch.isnan(logits).any():
                    raise ValueError(f"the teacher produced NaN logits in sequences {done}..{stop - 1}")
                if vocab is None:
                    vocab = int(logits.shape[-1])
                    _check_k(k, vocab)
                    layout = token_layout(k, vocab, value_dtype, value_bits, exact_k, curve)
                    arrays = {f: np.lib.format.open_memmap(tmp / f, mode="w+", dtype=np.dtype(info["dtype"]),
                                                           shape=(total, *info["shape"]))
                              for f, info in layout.items()}
                elif int(logits.shape[-1]) != vocab:
                    raise ValueError(f"the teacher's vocabulary changed from {vocab} to {logits.shape[-1]}")
                sel = batch.token_mask
                ids, lp, tail = encode_topk(logits[sel].cpu(), k)
                a, b = int(offsets[done]), int(offsets[stop])
                if ids.shape[0] != b - a:
                    raise ValueError(f"sequences {done}..{stop - 1}: {ids.shape[0]} trained-on positions, "
                                     f"expected {b - a}")
                for fname, rows in encode_token_rows(ids, lp, tail, vocab, value_dtype, value_bits, exact_k,
                                                     curve).items():
                    arrays[fname][a:b] = rows
                done = stop
                if time.monotonic() - last_commit >= COMMIT_INTERVAL_S:
                    _commit(tmp, arrays, key, layout, [vocab], done)
                    committed, last_commit = done, time.monotonic()
        if arrays is None:  # no sequence at all
            raise ValueError("the dataset holds no sequences")
        _commit(tmp, arrays, key, layout, [vocab], done)
    except BaseException as e:
        if arrays is not None and done > 0:
            try:
                _commit(tmp, arrays, key, layout, [vocab], done)
                committed = done
            except Exception:
                pass
        if committed == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        elif hasattr(e, "add_note"):
            e.add_note(f"kdistill: the token cache build stopped after {committed} of {n} sequences; its progress "
                       f"is kept in {tmp} and the same TokenCache.build call resumes it")
        raise
    finally:
        module.train(was_training)
        for p, flag in zip(module.parameters(), grad_flags):
            p.requires_grad_(flag)

    arrays.clear()
    np.save(tmp / "offsets.npy", offsets.numpy(), allow_pickle=False)
    np.save(tmp / "lengths.npy", dataset.lengths.numpy().astype(np.int32), allow_pickle=False)
    files = {}
    for fname in (*layout, "offsets.npy", "lengths.npy"):
        f = tmp / fname
        mm = np.load(f, mmap_mode="r")
        files[fname] = {"role": layout.get(fname, {}).get("role", fname[:-4]), "dtype": mm.dtype.str,
                        "shape": list(mm.shape), "bytes": f.stat().st_size, "sha256": file_sha256(f)}
        del mm
    from .. import __version__

    manifest = {
        **key,
        "kdistill_version": __version__,
        "teacher": {"fingerprint": key["teacher"], "class": type(module).__name__},
        "dataset": {"fingerprint": key["dataset"], "num_tokens": dataset.num_tokens, "pad_id": dataset.pad_id},
        "vocab_size": vocab,
        "tokenizer": {"vocab_size": vocab},
        "id_bits": bits_for(vocab),
        "ids": f"ids.npy[p] = the k ids, {bits_for(vocab)} bits each, bit-packed least significant bit first "
               f"(id j starts at bit j * {bits_for(vocab)} of the row)",
        "values": _values_description(k, value_dtype, value_bits, exact_k, curve),
        "num_positions": total,
        "bytes_per_position": token_row_bytes(layout),
        "tail": "tail.npy[p] = log(1 - sum of the k stored probabilities) at T=1, computed as the log-sum-exp "
                "of the other V-k log-probabilities (-inf when k = V)",
        "files": files,
    }
    _publish(tmp, path, manifest, replace=replace)


def _values_description(k: int, value_dtype: str, value_bits: int | None, exact_k: int | None,
                        curve: int | None) -> str:
    if exact_k is None or exact_k == k:
        return f"logprobs.npy[p] = the k log-probabilities at T=1, descending, as {value_dtype}"
    head = f"logprobs.npy[p] = the first {exact_k} log-probabilities at T=1, descending, as {value_dtype}; "
    if curve is not None:
        return head + (f"the other n = {k - exact_k} are curve.npy[p] @ B.T, B the (n, {curve}) orthonormal basis "
                       f"made by Gram-Schmidt, in order, of {list(CURVE_TERMS[:curve])} over ranks t = 0..n-1, "
                       "x = t / (n - 1) (kdistill.teacher.cache.bitpack.curve_basis)")
    return head + (f"codes.npy[p] = {value_bits}-bit codes c_j of the other {k - exact_k} (bit-packed like the ids): "
                   f"value_j = top - c_j * (top - low) / {2 ** value_bits - 1}, top = logprobs.npy[p, -1], "
                   f"low = low.npy[p] ({value_dtype})")


def _reopen(tmp: Path, progress: dict, total: int, k: int) -> dict[str, np.ndarray] | None:
    """The arrays of an interrupted build, writable; ``None`` if they do not match its record."""
    arrays = {}
    try:
        for fname, info in progress["layout"].items():
            mm = np.load(tmp / fname, mmap_mode="r+", allow_pickle=False)
            if list(mm.shape) != [total, *info["shape"]] or mm.dtype.str != info["dtype"]:
                return None
            arrays[fname] = mm
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return arrays or None
