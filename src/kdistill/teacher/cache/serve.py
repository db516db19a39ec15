"""Serving a teacher cache: :class:`TeacherCache`, a teacher that looks outputs up.

Build one with :meth:`TeacherCache.build`, open one with :meth:`TeacherCache.open`, and
pass it where a teacher goes (``Distiller(student, teacher=cache)``): it implements the
teacher protocol (:mod:`kdistill.teacher.base`) by reading rows instead of running a
network.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ...outputs import Batch, Outputs
from ..base import Teacher
from .build import build_cache
from .format import (VIEW_SEEDS, CacheError, CacheMismatchError, as_inputs, dataset_fingerprint,
                     read_manifest, teacher_fingerprint, teacher_module, topk_to_logits,
                     verify_checksums)


#: ``TeacherCache.open(in_memory=None)`` reads caches up to this size into RAM.
IN_MEMORY_BYTES = 256 * 2**20
#: A cache in RAM keeps its logits as float32 too (converted once, not at every batch) when
#: that copy takes at most this many bytes.
FLOAT32_LOGITS_BYTES = 64 * 2**20


class TeacherCache(Teacher):
    """A teacher cache on disk, served as a teacher: no forward pass at all.

    Row ``batch.index[i]`` of the cache gives sample ``i``'s outputs, so the data passed to
    ``fit`` must be the data the cache was built on, in the same order (or a subset served
    through :meth:`reindexed`). Build one with :meth:`build`, open one with :meth:`open`.

    Attributes:
        path: the cache directory.
        manifest: the parsed ``manifest.json``.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], arrays: dict[str, np.memmap]):
        self.path = Path(path)
        self.manifest = manifest
        self._arrays = arrays
        self._feature_files = {info["role"].split(":", 1)[1]: fname for fname, info in manifest["files"].items()
                               if info["role"].startswith("feature:")}
        self._views = int(manifest.get("views", 0))
        self._selected: list[str] | None = None  # None: every cached layer
        # the (layer, file) pairs __call__ serves: every cached layer until set_taps
        self._served = [(name, self._feature_files[name]) for name in sorted(manifest["features"])]
        self._temperature = 1.0  # set_temperatures: the losses'
        self._augmentation = None  # rebuilt from the manifest on first use
        self._row_of: torch.Tensor | None = None  # reindexed(): sample i -> stored row _row_of[i]
        # the arrays as tensors, read into RAM on first use when small enough (in_memory), else None
        self._tensors: dict[str, torch.Tensor] | None = None
        # the (N, C) logits in RAM when a batch's outputs are just rows of them (full logits, no
        # views, no layers served): __call__'s short path, one index_select and one cast
        self._ram_logits: torch.Tensor | None = None
        self._float32_logits: torch.Tensor | None = None  # the RAM logits as float32 (when small)
        self.in_memory = False

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
        return self._views

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
    ) -> "TeacherCache":
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
                (module docstring); e.g. ``(4.0,)`` for a distillation loss at
                ``temperature=4``.
            views: augmented views to store per sample (0: none, the samples as given).
            augment: with ``views``: a seeded augmentation (``seeded(x, seeds)`` and
                ``to_config()``: :class:`~kdistill.data.augment.RandomCrop`,
                ``RandomHorizontalFlip``, ``GaussianNoise`` or a ``Compose`` of them).
            seed: with ``views``: seeds the per-sample view seeds (recorded).
            overwrite: replace a cache of another teacher, data or settings at ``path``.
            resume: continue an interrupted build of the same teacher, data and settings.

        Returns:
            The finished cache, opened.

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
        built = build_cache(teacher, x, path, mode=mode, k=k, dtype=dtype, batch_size=batch_size,
                                   features=features, device=device, dataset_name=dataset_name,
                                   tail_temperatures=tail_temperatures, views=views, augment=augment, seed=seed,
                                   overwrite=overwrite, resume=resume)
        return cls.open(built, verify=False)  # checked as it was written (or found)

    # ------------------------------------------------------------------ open
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        teacher: nn.Module | None = None,
        x: torch.Tensor | np.ndarray | None = None,
        verify: bool = True,
        in_memory: bool | None = None,
    ) -> "TeacherCache":
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
            in_memory: read the arrays into RAM (rows are then gathered with
                ``index_select`` instead of from the memory maps, a few microseconds less
                per batch). ``None`` (default): when the cache holds at most
                :data:`IN_MEMORY_BYTES`; ``False``: always served from the memory maps.

        Returns:
            The cache, ready to serve as a teacher.

        Raises:
            CacheError: missing directory or manifest, unknown format version, a missing,
                truncated or corrupt file.
            CacheMismatchError: built from another teacher or other data.
        """
        path = Path(path)
        manifest = read_manifest(path)
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
                    f"given ({type(teacher_module(teacher)).__name__}) has {found[:23]}…. Open the cache "
                    "with the teacher it was built from, or rebuild it for this teacher "
                    "(TeacherCache.build(teacher, x, path, overwrite=True))."
                )
        if x is not None:
            inputs = as_inputs(x)
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
            verify_checksums(path, manifest)
        cache = cls(path, manifest, arrays)
        total = sum(int(info["bytes"]) for info in manifest["files"].values())
        cache.in_memory = total <= IN_MEMORY_BYTES if in_memory is None else bool(in_memory)
        return cache

    def __repr__(self) -> str:
        k = f", k={self.k}" if self.mode == "topk" else ""
        t = f", temperature={self._temperature:g}" if self._temperature != 1.0 else ""
        return (f"{type(self).__name__}({str(self.path)!r}, mode={self.mode!r}{k}{t}, "
                f"N={self.num_samples}, C={self.num_classes})")

    @property
    def temperature(self) -> float:
        """Top-k mode: the temperature at which the rebuilt logits give the exact top-k
        probabilities and tail mass: the distillation loss's, told by
        :meth:`set_temperatures` (1 until then). Full logits are exact at every temperature."""
        return self._temperature

    def set_temperatures(self, temperatures: Iterable[float]) -> None:
        """Serve logits exact at the losses' temperature (the Distiller calls this at
        ``compile`` with the temperatures of its distillation losses; in your own loop, call
        it with your loss's).

        Top-k mode rebuilds the tail for one temperature: 1, or one the build stored
        (``tail_temperatures``). Full logits are exact at every temperature: any is fine.

        Args:
            temperatures: the losses' temperatures (none: ``T = 1``).

        Raises:
            ValueError: top-k mode and the losses use several temperatures, or one whose
                tail the build did not store (rebuild with it in ``tail_temperatures``).
        """
        temps = sorted({float(t) for t in temperatures})
        if any(not 0 < t < math.inf for t in temps):
            raise ValueError(f"temperatures must be positive numbers, got {temps}")
        if self.mode != "topk":
            self._temperature = temps[0] if len(temps) == 1 else 1.0
            return
        if len(temps) > 1:
            raise ValueError(
                f"teacher cache {self.path} keeps the top {self.k} logits and rebuilds the others exactly at one "
                f"temperature, but the losses use {temps}: give them one temperature, or build a full-logit "
                "cache (mode='full')")
        t = temps[0] if temps else 1.0
        if t != 1.0 and t not in self.tail_temperatures:
            raise ValueError(
                f"teacher cache {self.path} stores the top-k tail at T=1 and at {self.tail_temperatures or 'no other'}"
                f" temperature, not at the losses' T={t:g}: rebuild it with "
                f"tail_temperatures={sorted({*self.tail_temperatures, t})} (TeacherCache.build), or distil at one of "
                "those"
            )
        self._temperature = t

    def reindexed(self, rows: Sequence[int] | np.ndarray | torch.Tensor) -> "TeacherCache":
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
            A cache whose ``batch.index`` runs over ``[0, M)``.

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
        view = type(self)(self.path, self.manifest, self._arrays)
        view._selected, view._temperature, view._augmentation = self._selected, self._temperature, self._augmentation
        view._served = self._served
        r = torch.from_numpy(r.astype(np.int64))
        view._row_of = r if self._row_of is None else self._row_of[r]
        view._tensors, view.in_memory, view._ram_logits = self._tensors, self.in_memory, self._ram_logits
        view._float32_logits = self._float32_logits
        return view

    @property
    def augmentation(self) -> Any:
        """The seeded augmentation the views were made with, rebuilt from the manifest
        (``None`` without views)."""
        if self.views and self._augmentation is None:
            from ...data.augment import from_config

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

        The Distiller gets it through :meth:`prepare`; in your own loop pass
        ``cache.prepare(batch, epoch)`` to ``train_step``.

        Args:
            batch: un-augmented training samples with their ``index``.
            epoch: the epoch (0-based).

        Raises:
            ValueError: the cache holds no views, or the batch has no index.
        """
        view = self.view_of_epoch(epoch)
        rows = self._rows(Batch(batch.inputs, batch.targets, batch.index, None, 0))  # view 0: the sample rows
        seeds = torch.from_numpy(np.ascontiguousarray(self._arrays[VIEW_SEEDS][view, rows.numpy()]))
        inputs = self.augmentation.seeded(batch.inputs, seeds)
        return Batch(inputs, batch.targets, batch.index, batch.mix, view)

    def prepare(self, batch: Batch, epoch: int) -> Batch:
        """The teacher protocol's per-batch call: with views, the batch as the teacher saw
        it in ``epoch`` (:meth:`augment_batch`); without, the batch unchanged. A batch that
        already carries its view is returned as it is."""
        if not self._views or batch.view is not None:
            return batch
        return self.augment_batch(batch, epoch)

    def resolve_augment(self, augment: Any) -> Any:
        """The augmentation ``fit`` may apply: none. The cache holds the teacher's outputs
        for the inputs it was built on; views are replayed by :meth:`prepare`.

        Args:
            augment: what ``fit`` was given (``None``: nothing).

        Returns:
            ``None``.

        Raises:
            ValueError: ``augment`` without views (the student would train on inputs the
                teacher never saw), or with views made by another augmentation.
        """
        if augment is None:
            return None
        if not self.views:
            raise ValueError(
                f"fit(augment={augment!r}) with teacher cache {self.path}, which holds the teacher's outputs "
                "for the un-augmented samples only: the student would train on inputs the teacher never saw. "
                "Build the cache with views (TeacherCache.build(teacher, x, path, views=V, augment=aug), or "
                "`kdistill cache ... --views V`), distil without augment=, or use the live teacher."
            )
        mine = augment.to_config() if callable(getattr(augment, "to_config", None)) else repr(augment)
        if json.loads(json.dumps(mine)) != self.augment_config:
            raise ValueError(
                f"fit(augment={augment!r}), but teacher cache {self.path} holds views made with "
                f"{self.augmentation!r}: the student must see the inputs the teacher saw. Leave augment= out "
                "(the cache replays its views) or rebuild the cache with this augmentation."
            )
        return None  # the views replace it (checked equal)

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
        self._served = [(name, self._feature_files[name]) for name in paths]
        self._ram_logits = self._short_path_logits()

    def _short_path_logits(self) -> torch.Tensor | None:
        """The logits array in RAM if ``__call__`` may serve batches as rows of it alone:
        as float32 (the dtype served) when that copy is small, so a batch needs no cast."""
        if self._tensors is None or self._views or self.mode != "full" or self._served:
            return None
        logits = self._tensors["logits.npy"]
        if logits.dtype != torch.float32 and 4 * logits.numel() <= FLOAT32_LOGITS_BYTES:
            if self._float32_logits is None:  # exact: float16 -> float32 loses nothing
                self._float32_logits = logits.float()
            return self._float32_logits
        return logits

    def _rows(self, batch: Batch) -> torch.Tensor:
        """The stored rows of the batch's samples: ``(B,)`` int64 on the CPU."""
        index = batch.index
        if index is None:
            raise ValueError(
                "a cached teacher looks samples up by batch.index, but this batch has none; pass "
                "arrays, tensors or a Dataset to fit (they carry indices), or build Batch(inputs, "
                "targets, index) yourself with each sample's row in the cached data"
            )
        if not isinstance(index, torch.Tensor):
            index = torch.as_tensor(index)
        if index.dim() != 1 or index.shape[0] != len(batch) or index.is_floating_point():
            raise ValueError(
                f"batch.index must be a (B,) integer tensor with one row per sample, got "
                f"{tuple(index.shape)} {index.dtype} for a batch of {len(batch)}"
            )
        rows = index.detach().to("cpu", torch.int64)
        n = self.num_samples
        served = n if self._row_of is None else len(self._row_of)
        view = batch.view
        lo, hi = (int(v) for v in torch.aminmax(rows)) if len(rows) else (0, 0)
        if lo < 0 or hi >= served:
            bad = (rows < 0) | (rows >= served)
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
        if not self._views:
            if view is not None:
                raise CacheMismatchError(
                    f"the batch is view {view} of an augmented cache, but teacher cache {self.path} holds the "
                    "un-augmented samples only (views=0); augment with the cache that made the view")
            return rows
        if view is None:
            raise ValueError(
                f"teacher cache {self.path} holds {self.views} augmented views per sample, and this batch says "
                "none: the Distiller applies them itself (fit without augment=); in your own loop pass "
                "cache.prepare(batch, epoch) to train_step")
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
        # 1. the short path (a full-logit cache in RAM, a batch of rows): what a hand-written loop
        #    does, one index_select and one cast. index_select refuses what is not rows of the
        #    array; the long path then explains it (or serves it: an index on another device)
        logits = self._ram_logits
        if logits is None and self._tensors is None and self.in_memory:
            self._tensors = {f: torch.from_numpy(np.array(a)) for f, a in self._arrays.items() if f != VIEW_SEEDS}
            logits = self._ram_logits = self._short_path_logits()
        if logits is not None and batch.view is None:
            index = batch.index
            try:
                picked = logits.index_select(0, index if self._row_of is None else self._row_of.index_select(0, index))
            except (TypeError, IndexError, RuntimeError):
                picked = None
            if picked is not None and index.dim() == 1 and picked.shape[0] == batch.inputs.shape[0]:
                device = batch.inputs.device
                if device.type == "cpu":
                    return Outputs(picked if picked.dtype == torch.float32 else picked.float())
                return Outputs(picked.to(device=device, dtype=torch.float32))
        # 2. the long path: every check, top-k logits, features, views, memory maps
        device = batch.inputs.device
        rows = self._rows(batch)
        if self._tensors is not None:
            def read(fname: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
                return self._tensors[fname].index_select(0, rows).to(device=device, dtype=dtype)
        else:
            picked = rows.numpy()

            def read(fname: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
                return torch.from_numpy(np.ascontiguousarray(self._arrays[fname][picked])).to(device=device,
                                                                                               dtype=dtype)

        if self.mode == "full":
            logits = read("logits.npy")
        else:
            t = self.temperature
            tail = read("tail.npy") if t == 1.0 else read("tail_at.npy")[..., self.tail_temperatures.index(t)]
            logits = topk_to_logits(read("topk_values.npy"), read("topk_indices.npy", torch.int64),
                                    tail, self.num_classes, temperature=t)
        features = {name: read(fname) for name, fname in self._served}
        return Outputs(logits=logits, features=features)
