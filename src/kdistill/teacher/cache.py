"""Offline teacher outputs: run the teacher once, distil from the stored outputs.

:meth:`TeacherCache.build` runs a teacher over a dataset in order and stores what it
produced (full logits, or the top-k logits and the mass of the other classes, plus any
tapped layers) as memory-mapped ``.npy`` files; :meth:`TeacherCache.open` maps them back
as a :class:`CachedTeacher`, which a :class:`~kdistill.Distiller` uses like a live
teacher: it looks each sample's outputs up by ``batch.index``, so no teacher forward runs
during distillation.

Layout of a cache directory::

    path/
      manifest.json        what was built, from what, and a checksum of every file
      logits.npy           mode="full": (N, C) in `dtype` (or (N, T, V) for sequences)
      topk_values.npy      mode="topk": (N, k) the k largest logits, in `dtype`, descending
      topk_indices.npy     mode="topk": (N, k) their classes, int16 (C <= 32767) or int32
      tail.npy             mode="topk": (N,) float32, log-sum-exp of the other C - k logits
      tail_at.npy          mode="topk" with tail_temperatures=(T1, ...): (N, m) float32,
                           log(sum exp(z / Tj)) over the same C - k logits, one column per Tj
      feature.<layer>.npy  one per tapped layer: (N, *shape) in `dtype`
      view_seeds.npy       with views=V: (V, N) int64, the seed of sample i's view v

With ``views=V`` every output array has ``V * N`` rows: row ``v * N + i`` holds the
teacher's outputs for view ``v`` of sample ``i``.

**The top-k tail.** ``tail[i] = log(sum_{c not in top-k} exp(z_ic))`` at ``T = 1``, so the
teacher's probability mass outside the top k is ``exp(tail - logsumexp([topk_values,
tail]))`` and nothing of the ``T = 1`` distribution is lost but how the tail mass is split
between the other classes. :class:`CachedTeacher` rebuilds ``(B, C)`` logits with the k
stored logits in place and every other class set to ``tail - log(C - k)``: the value
``C - k`` equal logits need to carry the same total mass. At ``T = 1`` the softmax of the
rebuilt logits is therefore exact for the top-k classes and for the total tail mass (up to
float rounding), with the tail spread uniformly (the maximum-entropy choice). At another
temperature the ratios between the top-k probabilities stay exact (they depend only on
the stored logits), but the tail mass is approximate: ``(C - k) * mean(a)^(1/T)`` stands
for ``sum(a^(1/T))`` with ``a = exp(z_tail)``; by Jensen's inequality the rebuilt tail is
*at least* the true one for ``T > 1`` (the top-k probabilities come out low) and
at most for ``T < 1``, and exact when the tail logits are equal. It is a proper
distribution at every temperature (softmax of finite logits). The filled value never
exceeds the k-th stored logit, so the top-k classes stay the top k.

The error at ``T > 1`` is not small when the tail holds real mass (measured on a tiny
10-class model, k=5, T=4: the KD loss comes out 4% low for a well-trained teacher, 28%
low for one that memorised noisy labels). A build with ``tail_temperatures=(4.0,)``
also stores ``log(sum exp(z_tail / 4))`` (4 bytes per sample per temperature); a cache
opened with ``temperature=4`` (or given ``cached.temperature = 4``) then fills the tail
with ``4 * (tail_at - log(C - k))``, which makes the softmax at ``T = 4`` exact for the
top-k classes and the tail mass (and the ``T = 1`` distribution the approximate one).
Set it to the temperature the Distiller is compiled with: the teacher is not told.

**Augmentation views.** A cache of the un-augmented samples cannot serve a student that
trains on augmented inputs: the teacher's outputs would be for other inputs. A build with
``views=V, augment=aug`` stores ``V`` augmented views per sample instead: view ``v`` of
sample ``i`` is ``aug.seeded(x[i], view_seeds[v, i])`` (seeded augmentations draw from the
per-sample seed alone, see :mod:`kdistill.data.augment`), and the manifest records the
augmentation (``aug.to_config()``) and the seeds. In epoch ``e`` the Distiller trains on
view ``e mod V``: it rebuilds each batch's inputs from the stored seeds
(:meth:`CachedTeacher.augment_batch`), so the student sees exactly the input the teacher
saw, in any batch order, after a resume, on any device. ``V`` epochs of views cost ``V``
teacher passes once; a longer run cycles through them (the student sees each view
``epochs / V`` times, where online distillation would draw a fresh one every epoch).

**Atomic and resumable.** A build writes into ``path.tmp-<pid>/`` and renames it to
``path`` only once every row, the checksums and the manifest are on disk: ``path`` is
either absent or complete. Progress (rows done) is committed to ``progress.json`` in the
temporary directory every :data:`COMMIT_INTERVAL_S` seconds and when the build fails; a
later build of the same teacher, data and settings (the same process or another, after a
kill) adopts that directory and continues from the committed row. A build that fails
before its first row is committed removes its temporary directory.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ..checkpoint import atomic_write_text
from ..errors import CheckpointError, KDistillError
from ..outputs import Batch, Outputs
from ..taps import CheckedForward, FeatureTaps

FORMAT = "kdistill-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
VIEW_SEEDS = "view_seeds.npy"

#: A build commits its progress (flushes the arrays, then writes ``progress.json``) at
#: least this often, in seconds, and whenever it stops on an exception.
COMMIT_INTERVAL_S = 5.0

_DTYPES = {"float16": np.float16, "float32": np.float32}
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


def _teacher_module(teacher: Any) -> nn.Module:
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
    for name, value in _teacher_module(teacher).state_dict().items():
        if not isinstance(value, torch.Tensor):
            continue  # extra state that is not a tensor carries no weights
        h.update(f"{name}|{list(value.shape)}|{value.dtype}\n".encode())
        h.update(_tensor_bytes(value))
    return "sha256:" + h.hexdigest()


def _as_inputs(x: Any) -> torch.Tensor:
    """``x`` as the tensor ``fit`` would batch (float64 becomes float32)."""
    from ..data.loader import as_tensor

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
    t = _as_inputs(x)
    h = hashlib.sha256()
    h.update(f"{list(t.shape)}|{t.dtype}\n".encode())
    h.update(_tensor_bytes(t))
    return "sha256:" + h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX; a no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":
        return False  # cannot probe without side effects: treat the directory as abandoned
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def estimate_size(teacher: nn.Module, x: torch.Tensor | np.ndarray, *, mode: str = "full", k: int | None = None,
                  dtype: str = "float16", features: Iterable[str] = (), tail_temperatures: Iterable[float] = (),
                  views: int = 0) -> dict[str, Any]:
    """What a :meth:`TeacherCache.build` with these settings would store, from one teacher
    forward on one sample (report it before building: cached feature maps can be large).

    Returns:
        ``{"num_samples", "rows", "bytes_per_sample", "total_bytes", "files": {file:
        bytes per sample}}`` (bytes per sample over every view; headers excluded).
    """
    module = _teacher_module(teacher)
    features = sorted(set([features] if isinstance(features, str) else features))
    inputs = _as_inputs(x)
    n, rows_per_sample = int(inputs.shape[0]), max(int(views), 1)
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    was_training = module.training
    module.eval()
    taps = FeatureTaps(module, features, role="teacher").install() if features else None
    try:
        with torch.inference_mode():
            logits = CheckedForward("teacher")(module, inputs[:1].to(device))
            captured = taps.pop() if taps is not None else {}
    finally:
        if taps is not None:
            taps.remove()
        module.train(was_training)
    temps = sorted({float(t) for t in tail_temperatures} - {1.0})
    rows = _encode(logits, captured, features, mode, k, temps, dtype, 0)
    files = {fname: int(value[0].nbytes) * rows_per_sample for fname, value in rows.items()}
    if views:
        files[VIEW_SEEDS] = 8 * int(views)
    per_sample = sum(files.values())
    return {"num_samples": n, "rows": n * rows_per_sample, "bytes_per_sample": per_sample,
            "total_bytes": per_sample * n, "files": files}


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``.<name>.lock`` beside ``path`` (POSIX ``flock``; no lock
    where ``fcntl`` does not exist): concurrent builds of one cache take turns."""
    try:
        import fcntl
    except ImportError:  # not POSIX: builds of one path must not run at once
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file closes
        yield


def make_view_seeds(seed: int, views: int, n: int) -> np.ndarray:
    """``(views, n)`` int64 seeds of every sample's views, a function of ``seed`` alone."""
    return np.random.default_rng(seed).integers(0, np.iinfo(np.int64).max, size=(views, n), dtype=np.int64)


def _feature_file(name: str, taken: set[str]) -> str:
    """A file name for a tapped layer (``"fc:input"`` -> ``"feature.fc_input.npy"``)."""
    base = "feature." + re.sub(r"[^A-Za-z0-9_.-]", "_", name)
    fname, i = base + ".npy", 1
    while fname in taken:
        fname, i = f"{base}.{i}.npy", i + 1
    return fname


# --------------------------------------------------------------------------- the cache
class TeacherCache:
    """A finished teacher cache on disk: its directory and manifest.

    Build one with :meth:`build`, open one with :meth:`open`; both return a
    :class:`CachedTeacher` (a ``TeacherCache`` that also serves the outputs).

    Attributes:
        path: the cache directory.
        manifest: the parsed ``manifest.json``.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = Path(path)
        self.manifest = manifest

    # ------------------------------------------------------------------ properties
    @property
    def num_samples(self) -> int:
        """``N``: the samples the cache holds (rows ``0 .. N-1`` of the data it was built on)."""
        return int(self.manifest["num_samples"])

    @property
    def num_classes(self) -> int:
        """``C``: the size of the teacher's last (class) axis."""
        return int(self.manifest["num_classes"])

    @property
    def mode(self) -> str:
        """``"full"`` or ``"topk"``."""
        return self.manifest["mode"]

    @property
    def k(self) -> int | None:
        """Classes stored per sample in top-k mode (``None`` for full logits)."""
        return self.manifest["k"]

    @property
    def tail_temperatures(self) -> list[float]:
        """Top-k mode: the temperatures besides 1 whose tail log-sum-exp is stored."""
        return list(self.manifest["tail_temperatures"])

    @property
    def taps(self) -> list[str]:
        """The teacher layers whose outputs the cache holds."""
        return sorted(self.manifest["features"])

    @property
    def views(self) -> int:
        """``V``: augmented views stored per sample (0: the un-augmented samples only)."""
        return int(self.manifest.get("views", 0))

    @property
    def augment_config(self) -> dict | None:
        """The ``to_config()`` of the augmentation the views were made with (``None``
        without views)."""
        return self.manifest.get("augment")

    @property
    def bytes_per_sample(self) -> int:
        """Bytes stored per sample, over every array (headers excluded)."""
        return int(self.manifest["bytes_per_sample"])

    def describe(self) -> dict[str, Any]:
        """A summary of the manifest (what ``kdistill cache info`` would print).

        Returns:
            ``{"path", "mode", "k", "tail_temperatures", "dtype", "num_samples", "num_classes", "logits_shape",
            "features", "views", "augment", "bytes_per_sample", "total_bytes", "teacher",
            "dataset", "kdistill_version", "format_version"}``.
        """
        m = self.manifest
        return {
            "path": str(self.path),
            "mode": m["mode"],
            "k": m["k"],
            "tail_temperatures": list(m["tail_temperatures"]),
            "dtype": m["dtype"],
            "num_samples": m["num_samples"],
            "num_classes": m["num_classes"],
            "logits_shape": m["logits_shape"],
            "features": dict(m["features"]),
            "views": int(m.get("views", 0)),
            "augment": m.get("augment"),
            "bytes_per_sample": m["bytes_per_sample"],
            "total_bytes": sum(f["bytes"] for f in m["files"].values()),
            "teacher": dict(m["teacher"]),
            "dataset": dict(m["dataset"]),
            "kdistill_version": m["kdistill_version"],
            "format_version": m["format_version"],
        }

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        teacher: nn.Module,
        x: torch.Tensor | np.ndarray,
        path: str | os.PathLike,
        *,
        mode: str = "full",
        k: int | None = None,
        dtype: str = "float16",
        batch_size: int = 256,
        features: Iterable[str] = (),
        device: str | torch.device | None = None,
        dataset_name: str | None = None,
        tail_temperatures: Iterable[float] = (),
        views: int = 0,
        augment: Any = None,
        seed: int = 0,
        overwrite: bool = False,
        resume: bool = True,
    ) -> "CachedTeacher":
        """Run ``teacher`` once over ``x`` (in order) and store its outputs in ``path``.

        The teacher runs as a Distiller runs it: through a
        :class:`~kdistill.teacher.LiveTeacher` (eval mode, ``torch.inference_mode()``, its
        speed options; pass a ``LiveTeacher`` to choose them), moved to ``device``; its
        training and ``requires_grad`` flags are restored afterwards. Row ``i``
        of the cache holds the outputs for ``x[i]``, so ``fit`` must be given the same
        data in the same order (its ``batch.index`` is the row). Without ``views`` the
        cache holds the teacher's outputs for the un-augmented samples and a Distiller
        refuses to augment with it; with ``views=V, augment=aug`` it holds V augmented
        views per sample (module docstring) and the Distiller replays them. Data passed to
        ``fit(..., unlabelled=u)`` is indexed after ``x``: build the cache over
        ``torch.cat([x, u])`` for that.

        If ``path`` already holds a cache of the same teacher, data and settings, it is
        opened (and verified) instead of rebuilt. An interrupted build of the same
        teacher, data and settings is resumed from its last committed row (see the module
        docstring); with ``resume=False`` it is discarded.

        Args:
            teacher: the trained network (or a :class:`~kdistill.teacher.LiveTeacher`);
                maps ``(B, ...)`` inputs to ``(B, C)`` (or ``(B, T, V)``) logits.
            x: ``(N, ...)`` inputs, numpy array or tensor.
            path: the cache directory to create.
            mode: ``"full"`` stores every logit; ``"topk"`` stores the ``k`` largest logits,
                their classes and the log-sum-exp of the others (the tail).
            k: classes kept per sample in top-k mode, ``1 <= k < C``.
            dtype: ``"float16"`` (half the size) or ``"float32"`` (exactly the teacher's
                float32 outputs) for logits, top-k values and features.
            batch_size: samples per teacher forward.
            features: teacher layers to store (module paths as for
                :class:`~kdistill.taps.FeatureTaps`, e.g. ``"layer3"``, ``"fc:input"``).
            device: where the teacher runs (default: :func:`kdistill.runtime.get_device`).
            dataset_name: a name recorded in the manifest (informational).
            tail_temperatures: top-k mode: temperatures other than 1 at which to store the
                tail's log-sum-exp too, so a cache opened at one of them rebuilds the
                softened distribution exactly for the top-k classes and the tail mass
                (module docstring); e.g. ``(4.0,)`` for a Distiller compiled with
                ``temperature=4``.
            views: augmented views to store per sample (0: none, the samples as given).
            augment: with ``views``: a seeded augmentation (``seeded(x, seeds)`` and
                ``to_config()``: :class:`~kdistill.data.augment.RandomCrop`,
                ``RandomHorizontalFlip``, ``GaussianNoise`` or a ``Compose`` of them).
            seed: with ``views``: seeds the per-sample view seeds (recorded).
            overwrite: replace a cache of another teacher, data or settings at ``path``.
            resume: continue an interrupted build of the same teacher, data and settings.

        Returns:
            The finished cache, opened as a :class:`CachedTeacher`.

        Raises:
            ValueError: a bad ``mode``, ``k``, ``dtype``, ``batch_size`` or ``views``; NaN
                logits; a float16 overflow (values beyond 65504: use ``dtype="float32"``).
            TypeError: ``augment`` cannot make seeded views (mixup, cutmix, a plain callable).
            CacheMismatchError: ``path`` holds a cache of another teacher, data or
                settings and ``overwrite`` is false.
            FileExistsError: ``path`` exists and is not a teacher cache.

        Builds of the same ``path`` take turns (a lock file ``.<name>.lock`` beside it):
        when several processes call it at once (every rank of a torchrun script, or rank 0
        alone while the others wait), one builds and the others then open its result.
        """
        args = dict(mode=mode, k=k, dtype=dtype, batch_size=batch_size, features=features, device=device,
                    dataset_name=dataset_name, tail_temperatures=tail_temperatures, views=views, augment=augment,
                    seed=seed, overwrite=overwrite, resume=resume)
        with _build_lock(Path(path)):
            return cls._build_here(teacher, x, path, **args)

    @classmethod
    def _build_here(cls, teacher: nn.Module, x: torch.Tensor | np.ndarray, path: str | os.PathLike, *, mode: str,
                    k: int | None, dtype: str, batch_size: int, features: Iterable[str],
                    device: str | torch.device | None, dataset_name: str | None, tail_temperatures: Iterable[float],
                    views: int, augment: Any, seed: int, overwrite: bool, resume: bool) -> "CachedTeacher":
        """:meth:`build` in this process."""
        from .. import __version__
        from ..runtime import get_device

        # 1. check the arguments
        module = _teacher_module(teacher)
        if mode not in ("full", "topk"):
            raise ValueError(f"mode must be 'full' or 'topk', got {mode!r}")
        if mode == "topk":
            if not isinstance(k, int) or isinstance(k, bool) or k < 1:
                raise ValueError(f"mode='topk' needs k, a positive integer (classes kept per sample), got {k!r}")
        elif k is not None:
            raise ValueError(f"k={k!r} is only used with mode='topk'; pass mode='topk' or leave k out")
        tail_temperatures = sorted({float(t) for t in tail_temperatures} - {1.0})
        if tail_temperatures and mode != "topk":
            raise ValueError(
                f"tail_temperatures={tail_temperatures} only apply to mode='topk' (full logits are exact "
                "at every temperature); leave them out"
            )
        if not all(0 < t < math.inf for t in tail_temperatures):
            raise ValueError(f"tail_temperatures must be positive finite numbers, got {tail_temperatures}")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if isinstance(features, str):
            features = [features]
        features = sorted(set(features))
        if not all(isinstance(f, str) and f for f in features):
            raise TypeError(f"features must be module paths (strings), got {features!r}")
        aug_spec, view_seeds = None, None
        if not isinstance(views, int) or isinstance(views, bool) or views < 0:
            raise ValueError(f"views must be a non-negative integer (augmented views per sample), got {views!r}")
        if views:
            if augment is None:
                raise ValueError(
                    f"views={views} needs augment=, the seeded augmentation that makes them (e.g. "
                    "Compose([RandomCrop(4), RandomHorizontalFlip()])); views=0 caches the samples as given")
            from ..data.augment import check_seeded

            check_seeded(augment)
            aug_spec = json.loads(json.dumps(augment.to_config()))
        elif augment is not None:
            raise ValueError(
                "augment= is only used with views=V >= 1 (the number of augmented views to store per sample); "
                "pass views, or leave augment out to cache the un-augmented samples")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        inputs = _as_inputs(x)
        n = int(inputs.shape[0])
        total = n * max(views, 1)  # rows of every output array
        if views:
            view_seeds = make_view_seeds(seed, views, n)
        path = Path(path)
        from .live import LiveTeacher

        if isinstance(teacher, LiveTeacher) and device is None:  # it runs where it was put
            dev = next((q.device for q in module.parameters()), get_device(None))
        else:
            dev = get_device(device)

        # 2. what is being built: the key an existing or interrupted build must match
        key = {
            "format_version": FORMAT_VERSION,
            "teacher": teacher_fingerprint(module),
            "dataset": dataset_fingerprint(inputs),
            "num_samples": n,
            "mode": mode,
            "k": k,
            "tail_temperatures": tail_temperatures,
            "dtype": dtype,
            "features": features,
            "views": views,
            "augment": aug_spec,
            "view_seed": seed if views else None,
        }

        # 3. an existing directory: the same cache is opened, another one needs overwrite
        replace = False
        if path.exists():
            if not path.is_dir():
                raise FileExistsError(f"cannot build a teacher cache at {path}: a file is there; choose another path")
            if (path / MANIFEST).is_file():
                try:
                    existing = _manifest_key(_read_manifest(path))
                    if existing == key:
                        return CachedTeacher.open(path, verify=True)
                except CacheError:
                    if not overwrite:
                        raise  # damaged: the message says to rebuild (overwrite=True)
                else:
                    if not overwrite:
                        raise CacheMismatchError(
                            f"{path} already holds a teacher cache of other {_key_difference(existing, key)}; "
                            "pass overwrite=True (kdistill cache build --overwrite) to replace it, or build into another path"
                        )
                replace = True
            elif any(path.iterdir()):
                raise FileExistsError(
                    f"cannot build a teacher cache at {path}: the directory exists, is not empty and "
                    f"holds no {MANIFEST}; choose another path or empty it"
                )
            else:
                path.rmdir()  # an empty directory: take its place

        # 4. the temporary directory: adopt an interrupted build of this key, or start one
        tmp, progress = _claim_temp(path, key, resume)
        rows_done, arrays = 0, None
        if progress is not None:
            arrays = _reopen_arrays(tmp, progress)
            if arrays is None:  # its files do not match its progress record: start over
                shutil.rmtree(tmp)
                tmp.mkdir(parents=True)
            else:
                rows_done = int(progress["rows_done"])
        layout: dict[str, dict[str, Any]] = {} if arrays is None else progress["layout"]
        logits_shape: list[int] = [] if arrays is None else progress["logits_shape"]

        # 5. run the teacher over the rows not done yet, committing progress as it goes. It
        # runs as a Distiller runs it (a LiveTeacher, with its speed options), so a float32
        # cache holds exactly what online distillation would get.
        was_training = module.training
        grad_flags = [p.requires_grad for p in module.parameters()]
        live = teacher if isinstance(teacher, LiveTeacher) else LiveTeacher(module, dev)
        if features:
            live.set_taps(features)
        last_commit = time.monotonic()
        committed = rows_done
        try:
            with torch.inference_mode():
                start = rows_done
                while start < total:
                    # rows v*N + i0 .. v*N + i1 - 1: samples i0 .. i1 - 1 of view v (a batch never spans views)
                    v, i0 = divmod(start, n)
                    i1 = min(n, i0 + batch_size)
                    stop = v * n + i1
                    xb = inputs[i0:i1].to(dev)
                    if views:
                        xb = augment.seeded(xb, torch.from_numpy(view_seeds[v, i0:i1]))
                    out = live(Batch(xb))
                    logits, captured = out.logits, out.features  # (B, C) or (B, T, V); tapped layers
                    rows = _encode(logits, captured, features, mode, k, tail_temperatures, dtype, i0)
                    if arrays is None:
                        layout, logits_shape = _layout(rows, features), list(logits.shape[1:])
                        arrays = _create_arrays(tmp, layout, rows, total)
                    _check_rows(rows, arrays, logits, logits_shape, i0)
                    for fname, value in rows.items():
                        arrays[fname][start:stop] = value
                    rows_done = start = stop
                    if time.monotonic() - last_commit >= COMMIT_INTERVAL_S:
                        _commit(tmp, arrays, key, layout, logits_shape, rows_done)
                        committed, last_commit = rows_done, time.monotonic()
            _commit(tmp, arrays, key, layout, logits_shape, rows_done)
        except BaseException as e:
            if arrays is not None and rows_done > 0:
                try:
                    _commit(tmp, arrays, key, layout, logits_shape, rows_done)
                    committed = rows_done
                except Exception:
                    pass  # the last committed progress stands
            if committed == 0:
                arrays = None
                shutil.rmtree(tmp, ignore_errors=True)
            elif hasattr(e, "add_note"):
                e.add_note(
                    f"kdistill: the teacher cache build stopped after {committed} of {total} "
                    + (f"rows ({views} views x {n} samples); " if views else "samples; ") +
                    f"its progress is kept in {tmp} and the same TeacherCache.build call resumes it"
                )
            raise
        finally:
            if features:
                live.set_taps([])
            module.train(was_training)
            for p, flag in zip(module.parameters(), grad_flags):
                p.requires_grad_(flag)

        # 6. checksums and manifest, then one rename makes the cache appear whole
        arrays.clear()  # close the memory maps before hashing and renaming
        files = {}
        for fname, info in layout.items():
            f = tmp / fname
            files[fname] = {
                **info,
                "shape": [total, *info["shape"]],
                "bytes_per_sample": info["bytes_per_sample"] * max(views, 1),  # over every view
                "bytes": f.stat().st_size,
                "sha256": _file_sha256(f),
            }
        if views:
            f = tmp / VIEW_SEEDS
            np.save(f, view_seeds, allow_pickle=False)
            files[VIEW_SEEDS] = {"role": "view_seeds", "dtype": view_seeds.dtype.str, "shape": [views, n],
                                 "bytes_per_sample": 8 * views, "bytes": f.stat().st_size, "sha256": _file_sha256(f)}
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kdistill_version": __version__,
            "teacher": {"fingerprint": key["teacher"], "class": type(module).__name__},
            "dataset": {
                "fingerprint": key["dataset"],
                "name": dataset_name,
                "shape": list(inputs.shape),
                "dtype": str(inputs.dtype).replace("torch.", ""),
            },
            "num_samples": n,
            "num_classes": logits_shape[-1],
            "logits_shape": logits_shape,
            "mode": mode,
            "k": k,
            "dtype": dtype,
            "tail": TAIL_DESCRIPTION if mode == "topk" else None,
            "tail_temperatures": tail_temperatures,
            "features": {name: info["shape"] for name, info in _feature_infos(layout).items()},
            "views": views,
            "augment": aug_spec,
            "view_seed": seed if views else None,
            "files": files,
            "bytes_per_sample": sum(info["bytes_per_sample"] for info in files.values()),
        }
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        (tmp / PROGRESS).unlink(missing_ok=True)
        _fsync_dir(tmp)
        if replace:
            old = path.with_name(f"{path.name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync_dir(path.parent)
        return CachedTeacher.open(path, verify=False)

    # ------------------------------------------------------------------ open
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        teacher: nn.Module | None = None,
        x: torch.Tensor | np.ndarray | None = None,
        verify: bool = True,
        temperature: float = 1.0,
    ) -> "CachedTeacher":
        """Open a finished cache read-only (memory-mapped), after checking it.

        Checks, in order: the manifest exists and has a known format version; every file
        is there with the size and the array shape and dtype the manifest records; the
        teacher's fingerprint (if ``teacher`` is given); the dataset's size and
        fingerprint (if ``x`` is given); every file's SHA-256 (if ``verify``).

        Args:
            path: the cache directory.
            teacher: the network the cache should come from.
            x: the ``(N, ...)`` data the cache should have been built on.
            verify: hash every file and compare with the manifest (reads the whole cache).
            temperature: top-k mode: the temperature at which the rebuilt logits are exact
                (1, or one of the build's ``tail_temperatures``); see
                :attr:`CachedTeacher.temperature`.

        Returns:
            A :class:`CachedTeacher`.

        Raises:
            CacheError: missing directory or manifest, unknown format version, a missing,
                truncated or corrupt file.
            CacheMismatchError: built from another teacher or other data.
        """
        path = Path(path)
        manifest = _read_manifest(path)
        arrays: dict[str, np.memmap] = {}
        for fname, info in manifest["files"].items():
            f = path / fname
            if not f.is_file():
                raise CacheError(
                    f"teacher cache {path} is incomplete: {fname} is missing (the manifest lists it). "
                    "Rebuild the cache (TeacherCache.build(..., overwrite=True))."
                )
            size = f.stat().st_size
            if size != info["bytes"]:
                raise CacheError(
                    f"teacher cache {path} is truncated or damaged: {fname} has {size} bytes, the manifest "
                    f"expects {info['bytes']} ({info['shape']} {info['dtype']}). Rebuild the cache "
                    "(TeacherCache.build(..., overwrite=True)) or restore an intact copy."
                )
            try:
                mm = np.load(f, mmap_mode="r", allow_pickle=False)
            except Exception as e:
                raise CacheError(
                    f"teacher cache {path}: {fname} is not a readable .npy file ({type(e).__name__}: {e}); "
                    "rebuild the cache (TeacherCache.build(..., overwrite=True))"
                ) from e
            if list(mm.shape) != list(info["shape"]) or mm.dtype.str != info["dtype"]:
                raise CacheError(
                    f"teacher cache {path}: {fname} holds a {list(mm.shape)} {mm.dtype.str} array, the "
                    f"manifest expects {info['shape']} {info['dtype']}; rebuild the cache"
                )
            arrays[fname] = mm
        if teacher is not None:
            found = teacher_fingerprint(teacher)
            if found != manifest["teacher"]["fingerprint"]:
                raise CacheMismatchError(
                    f"teacher cache {path} was built from another teacher: its weights' fingerprint is "
                    f"{manifest['teacher']['fingerprint'][:23]}… ({manifest['teacher']['class']}), the teacher "
                    f"given ({type(_teacher_module(teacher)).__name__}) has {found[:23]}…. Open the cache "
                    "with the teacher it was built from, or rebuild it for this teacher "
                    "(TeacherCache.build(teacher, x, path, overwrite=True))."
                )
        if x is not None:
            inputs = _as_inputs(x)
            ds = manifest["dataset"]
            if int(inputs.shape[0]) != manifest["num_samples"]:
                raise CacheMismatchError(
                    f"teacher cache {path} holds {manifest['num_samples']} samples (dataset "
                    f"{ds.get('name') or 'unnamed'}, shape {ds['shape']}), the data given has "
                    f"{inputs.shape[0]} (shape {list(inputs.shape)}). Pass the data the cache was built on, "
                    "in the same order, or rebuild the cache for this data."
                )
            found = dataset_fingerprint(inputs)
            if found != ds["fingerprint"]:
                raise CacheMismatchError(
                    f"teacher cache {path} was built on other data: the dataset fingerprint is "
                    f"{ds['fingerprint'][:23]}… (shape {ds['shape']}, {ds['dtype']}), the data given has "
                    f"{found[:23]}… (shape {list(inputs.shape)}, {str(inputs.dtype).replace('torch.', '')}). "
                    "Rows are looked up by index, so the data must be the same samples in the same order "
                    "(no reshuffle, no other preprocessing); pass that data or rebuild the cache for this one."
                )
        if verify:
            for fname, info in manifest["files"].items():
                found = _file_sha256(path / fname)
                if found != info["sha256"]:
                    raise CacheError(
                        f"teacher cache {path} is corrupt: the checksum of {fname} is {found[:23]}…, the "
                        f"manifest records {info['sha256'][:23]}…. Rebuild the cache "
                        "(TeacherCache.build(..., overwrite=True)) or restore an intact copy."
                    )
        cached = CachedTeacher(path, manifest, arrays)
        cached.temperature = temperature
        return cached

    def __repr__(self) -> str:
        k = f", k={self.k}" if self.mode == "topk" else ""
        t = getattr(self, "temperature", 1.0)
        t = f", temperature={t:g}" if t != 1.0 else ""
        return (f"{type(self).__name__}({str(self.path)!r}, mode={self.mode!r}{k}{t}, "
                f"N={self.num_samples}, C={self.num_classes})")


class CachedTeacher(TeacherCache):
    """A teacher that serves stored outputs by sample index: no forward pass at all.

    Use it wherever a teacher goes (``Distiller(student, teacher=cached)``): it is
    callable ``batch -> Outputs`` and has ``parameters()`` (none). Row ``batch.index[i]``
    of the cache gives sample ``i``'s outputs, so the data passed to ``fit`` must be the
    data the cache was built on, in the same order, with no augmentation.

    Get one from :meth:`TeacherCache.open` or :meth:`TeacherCache.build`.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], arrays: dict[str, np.memmap]):
        super().__init__(path, manifest)
        self._arrays = arrays
        self._feature_files = {info["role"].split(":", 1)[1]: fname for fname, info in manifest["files"].items()
                               if info["role"].startswith("feature:")}
        self._selected: list[str] | None = None  # None: every cached layer
        self._temperature = 1.0
        self._augmentation = None  # rebuilt from the manifest on first use
        self._row_of: np.ndarray | None = None  # reindexed(): sample i -> stored row _row_of[i]

    @property
    def temperature(self) -> float:
        """Top-k mode: the temperature at which the rebuilt logits give the exact top-k
        probabilities and tail mass (1 by default; another one needs the build's
        ``tail_temperatures`` to hold it). Set it to the Distiller's temperature. Full
        logits are exact at every temperature and ignore it."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        t = float(value)
        if not 0 < t < math.inf:
            raise ValueError(f"temperature must be a positive number, got {value!r}")
        if t != 1.0 and self.mode == "topk" and t not in self.tail_temperatures:
            raise ValueError(
                f"teacher cache {self.path} stores the top-k tail at T=1 and at {self.tail_temperatures or 'no other'}"
                f" temperature, not at T={value}: open it at one of those, or rebuild it with "
                f"tail_temperatures={sorted({*self.tail_temperatures, t})}"
            )
        self._temperature = t

    def reindexed(self, rows: Sequence[int] | np.ndarray | torch.Tensor) -> "CachedTeacher":
        """This cache, serving sample ``i`` of the data you distil on from stored row ``rows[i]``.

        Distil on a subset or a reordering of the data the cache was built on without a
        second teacher pass: one cache over a whole training set serves every labelled
        subset of it (``kdistill classic`` builds one cache and serves both its
        few-label and its all-label regime from it). The files are shared, nothing is
        copied; temperature and served layers start as this cache's.

        Args:
            rows: ``(M,)`` distinct stored rows in ``[0, N)``, in the order of the data
                passed to ``fit`` (for ``fit(x, unlabelled=u)``: the rows of ``x``, then
                those of ``u``).

        Returns:
            A :class:`CachedTeacher` whose ``batch.index`` runs over ``[0, M)``.

        Raises:
            ValueError: ``rows`` is not a 1-D integer array, repeats a row, or holds a
                row outside ``[0, N)``.
        """
        r = np.asarray(rows.cpu() if isinstance(rows, torch.Tensor) else rows)
        if r.ndim != 1 or not np.issubdtype(r.dtype, np.integer):
            raise ValueError(f"rows must be a 1-D array of integer row numbers, got shape {r.shape} {r.dtype}")
        n = self.num_samples
        if r.size and (r.min() < 0 or r.max() >= n):
            raise ValueError(f"rows must lie in [0, {n}) (teacher cache {self.path} holds {n} samples), "
                             f"got values from {int(r.min())} to {int(r.max())}")
        if len(np.unique(r)) != len(r):
            raise ValueError("rows repeats a stored row: give each sample of the data you distil on its own row")
        view = CachedTeacher(self.path, self.manifest, self._arrays)
        view._selected, view._temperature, view._augmentation = self._selected, self._temperature, self._augmentation
        view._row_of = r.astype(np.int64) if self._row_of is None else self._row_of[r]
        return view

    def parameters(self) -> Iterator[nn.Parameter]:
        """No parameters: nothing of a cached teacher trains or is frozen."""
        return iter(())

    @property
    def augmentation(self) -> Any:
        """The seeded augmentation the views were made with, rebuilt from the manifest
        (``None`` without views)."""
        if self.views and self._augmentation is None:
            from ..data.augment import from_config

            self._augmentation = from_config(self.augment_config)
        return self._augmentation

    def view_of_epoch(self, epoch: int) -> int:
        """The view a student trains on in ``epoch``: ``epoch mod V``."""
        if not self.views:
            raise ValueError(f"teacher cache {self.path} holds no augmented views (built with views=0)")
        return int(epoch) % self.views

    def augment_batch(self, batch: Batch, epoch: int) -> Batch:
        """The batch as the teacher saw it in view ``epoch mod V``: each sample's inputs
        augmented from its stored seed, ``batch.view`` set so the cache serves that view.

        The Distiller calls this on every training batch of a cache with views; call it in
        your own loop before ``train_step``.

        Args:
            batch: un-augmented training samples with their ``index``.
            epoch: the epoch (0-based).

        Raises:
            ValueError: the cache holds no views, or the batch has no index.
        """
        view = self.view_of_epoch(epoch)
        rows = self._rows(Batch(batch.inputs, batch.targets, batch.index, None, 0))  # view 0: the sample rows
        seeds = torch.from_numpy(np.ascontiguousarray(self._arrays[VIEW_SEEDS][view, rows]))
        inputs = self.augmentation.seeded(batch.inputs, seeds)
        return Batch(inputs, batch.targets, batch.index, batch.mix, view)

    def set_taps(self, paths: Iterable[str]) -> None:
        """Serve only these cached layers in ``Outputs.features`` (``[]``: none).

        By default every cached layer is served.

        Raises:
            ValueError: a layer the cache does not hold (the cached ones are listed).
        """
        paths = sorted(set(paths))
        missing = [p for p in paths if p not in self._feature_files]
        if missing:
            raise ValueError(
                f"teacher cache {self.path} holds no output of layer(s) {missing}; it holds "
                f"{self.taps or 'no layers'}. Rebuild it with features={sorted(set(self.taps) | set(paths))}."
            )
        self._selected = paths

    def _rows(self, batch: Batch) -> np.ndarray:
        index = batch.index
        if index is None:
            raise ValueError(
                "a cached teacher looks samples up by batch.index, but this batch has none; pass "
                "arrays, tensors or a Dataset to fit (they carry indices), or build Batch(inputs, "
                "targets, index) yourself with each sample's row in the cached data"
            )
        index = torch.as_tensor(index)
        if index.dim() != 1 or index.shape[0] != len(batch) or index.is_floating_point():
            raise ValueError(
                f"batch.index must be a (B,) integer tensor with one row per sample, got "
                f"{tuple(index.shape)} {index.dtype} for a batch of {len(batch)}"
            )
        rows = index.detach().to("cpu", torch.int64).numpy()
        n = self.num_samples
        served = n if self._row_of is None else len(self._row_of)
        view = batch.view
        bad = (rows < 0) | (rows >= served)
        if bad.any():
            first = int(rows[bad][0])
            what = (f"holds rows 0..{n - 1} of a dataset of {n} samples" if self._row_of is None
                    else f"serves {served} samples (reindexed to rows of a dataset of {n})")
            raise CacheMismatchError(
                f"batch.index holds {first} (and {int(bad.sum()) - 1} more out of range), but teacher "
                f"cache {self.path} {what}. Distil on the data "
                "the cache was built on; data passed as fit(..., unlabelled=u) comes after x, so build the "
                "cache over torch.cat([x, u]) for it."
            )
        if self._row_of is not None:
            rows = self._row_of[rows]
        if not self.views:
            if view is not None:
                raise CacheMismatchError(
                    f"the batch is view {view} of an augmented cache, but teacher cache {self.path} holds the "
                    "un-augmented samples only (views=0); augment with the cache that made the view")
            return rows
        if view is None:
            raise ValueError(
                f"teacher cache {self.path} holds {self.views} augmented views per sample, and this batch says "
                "none: the Distiller applies them itself (fit without augment=); in your own loop pass "
                "cached.augment_batch(batch, epoch) to train_step")
        if not 0 <= int(view) < self.views:
            raise CacheMismatchError(f"batch.view is {view}, teacher cache {self.path} holds views 0..{self.views - 1}")
        return rows + int(view) * n

    def __call__(self, batch: Batch) -> Outputs:
        """The cached outputs of the batch's samples.

        Args:
            batch: a batch whose ``index`` is ``(B,)`` rows of the cached data.

        Returns:
            ``Outputs(logits, features)`` on the batch's device, float32: ``logits`` of
            shape ``(B, C)`` (or ``(B, T, V)``), in top-k mode rebuilt with the other
            classes sharing the tail mass (module docstring); ``features`` maps each
            served layer to ``(B, *shape)``.

        Raises:
            ValueError: ``batch.index`` is missing or malformed.
            CacheMismatchError: an index outside ``[0, N)``.
        """
        rows = self._rows(batch)
        device = batch.inputs.device

        def read(fname: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(self._arrays[fname][rows])).to(device=device, dtype=dtype)

        if self.mode == "full":
            logits = read("logits.npy")
        else:
            t = self.temperature
            tail = read("tail.npy") if t == 1.0 else read("tail_at.npy")[..., self.tail_temperatures.index(t)]
            logits = topk_to_logits(read("topk_values.npy"), read("topk_indices.npy", torch.int64),
                                    tail, self.num_classes, temperature=t)
        names = self.taps if self._selected is None else self._selected
        features = {name: read(self._feature_files[name]) for name in names}
        return Outputs(logits=logits, features=features)


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


# --------------------------------------------------------------------------- build helpers
def _encode(logits: torch.Tensor, captured: dict[str, torch.Tensor], features: list[str], mode: str,
            k: int | None, tail_temperatures: list[float], dtype: str, start: int) -> dict[str, np.ndarray]:
    """One batch's outputs as the arrays stored: ``{file name: (B, ...) array}``."""
    np_dtype = _DTYPES[dtype]
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
        fname = _feature_file(name, taken)
        taken.add(fname)
        out[fname] = store(f"outputs of layer '{name}'", captured[name])
    return out


def _layout(rows: dict[str, np.ndarray], features: list[str]) -> dict[str, dict[str, Any]]:
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


def _feature_infos(layout: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``{layer: {"file", "shape"}}`` of the feature arrays in a layout."""
    return {info["role"].split(":", 1)[1]: {"file": fname, "shape": info["shape"]}
            for fname, info in layout.items() if info["role"].startswith("feature:")}


def _create_arrays(tmp: Path, layout: dict[str, dict[str, Any]], rows: dict[str, np.ndarray],
                   n: int) -> dict[str, np.memmap]:
    """The ``(N, ...)`` arrays of a new build, memory-mapped for writing."""
    return {
        fname: np.lib.format.open_memmap(tmp / fname, mode="w+", dtype=rows[fname].dtype, shape=(n, *info["shape"]))
        for fname, info in layout.items()
    }


def _check_rows(rows: dict[str, np.ndarray], arrays: dict[str, np.memmap], logits: torch.Tensor,
                logits_shape: list[int], start: int) -> None:
    """Every batch must have the first batch's per-sample shapes (and a resumed build the
    interrupted one's)."""
    if list(logits.shape[1:]) != logits_shape:
        raise ValueError(
            f"the teacher's logits changed shape at sample {start}: {list(logits.shape[1:])} per sample, "
            f"earlier batches {logits_shape}; a cache needs one shape for all samples"
        )
    for fname, value in rows.items():
        mm = arrays.get(fname)
        if mm is None or mm.shape[1:] != value.shape[1:] or mm.dtype != value.dtype:
            raise ValueError(
                f"the teacher's outputs changed shape at sample {start}: {fname} has per-sample shape "
                f"{list(value.shape[1:])} {value.dtype}, earlier batches "
                f"{None if mm is None else list(mm.shape[1:])}; a cache needs one shape per output"
            )


def _commit(tmp: Path, arrays: dict[str, np.memmap], key: dict, layout: dict, logits_shape: list[int],
            rows_done: int) -> None:
    """Flush the rows written so far, then record how many there are (in that order)."""
    for mm in arrays.values():
        mm.flush()
    record = {"key": key, "rows_done": rows_done, "layout": layout, "logits_shape": logits_shape}
    atomic_write_text(tmp / PROGRESS, json.dumps(record, indent=2, sort_keys=True) + "\n")


def _claim_temp(path: Path, key: dict, resume: bool) -> tuple[Path, dict | None]:
    """This build's temporary directory, and the progress of the interrupted build of the
    same key it adopted (``None`` when it starts afresh).

    Temporary directories of builds whose process is gone are adopted (same key, with
    ``resume``) or removed (another key: they are superseded by this build of ``path``);
    those of running processes are left alone.
    """
    ours = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    want = json.loads(json.dumps(key))
    adopted = None
    for cand in sorted(Path(p) for p in glob.glob(glob.escape(str(path)) + ".tmp-*")):
        suffix = cand.name[len(path.name) + len(".tmp-"):]
        if not suffix.isdigit() or not cand.is_dir():
            continue
        pid = int(suffix)
        if pid != os.getpid() and _pid_alive(pid):
            continue  # another process is building it now
        progress = None
        try:
            progress = json.loads((cand / PROGRESS).read_text())
        except (OSError, ValueError):
            pass
        if (resume and adopted is None and isinstance(progress, dict) and progress.get("key") == want
                and int(progress.get("rows_done", 0)) > 0):
            if cand != ours:
                if ours.exists():
                    shutil.rmtree(ours)
                os.replace(cand, ours)
            adopted = progress
        elif cand != ours or adopted is None:
            shutil.rmtree(cand, ignore_errors=True)
    if adopted is None:
        ours.mkdir(parents=True)
    return ours, adopted


def _reopen_arrays(tmp: Path, progress: dict) -> dict[str, np.memmap] | None:
    """The arrays of an interrupted build, writable; ``None`` if they do not match its record."""
    n = progress["key"]["num_samples"] * max(int(progress["key"].get("views", 0)), 1)
    if not isinstance(progress.get("logits_shape"), list) or not isinstance(progress.get("layout"), dict):
        return None
    arrays = {}
    try:
        for fname, info in progress["layout"].items():
            mm = np.load(tmp / fname, mmap_mode="r+", allow_pickle=False)
            if list(mm.shape) != [n, *info["shape"]] or mm.dtype.str != info["dtype"]:
                return None
            arrays[fname] = mm
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return arrays or None


# --------------------------------------------------------------------------- manifest helpers
def _read_manifest(path: Path) -> dict[str, Any]:
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


def _manifest_key(manifest: dict[str, Any]) -> dict[str, Any]:
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


def _key_difference(found: dict[str, Any], wanted: dict[str, Any]) -> str:
    """Which parts of two build keys differ, in words."""
    parts = []
    for name in ("teacher", "dataset", "num_samples", "mode", "k", "tail_temperatures", "dtype", "features",
                 "views", "augment", "view_seed"):
        if found.get(name) != wanted.get(name):
            parts.append(f"{name} ({found.get(name)} there, {wanted.get(name)} asked for)"
                         if name not in ("teacher", "dataset") else f"{name} weights/bytes")
    return ", ".join(parts) or "settings"
