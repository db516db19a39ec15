"""Building a teacher cache: run the teacher once, write its outputs durably.

A build writes into ``path.tmp-<pid>/`` and renames it to ``path`` only once every row,
the checksums and the manifest are on disk: ``path`` is either absent or complete.
Progress (rows done) is committed to ``progress.json`` in the temporary directory every
:data:`COMMIT_INTERVAL_S` seconds and when the build fails; a later build of the same
teacher, data and settings (the same process or another, after a kill) adopts that
directory and continues from the committed row. A build that fails before its first row
is committed removes its temporary directory. Builds of one path take turns on a lock file.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from ...atomic import atomic_write_text, fsync_dir
from ...outputs import Batch
from ...taps import CheckedForward, FeatureTaps
from .format import (DTYPES, FORMAT, FORMAT_VERSION, MANIFEST, PROGRESS, TAIL_DESCRIPTION, VIEW_SEEDS, CacheError,
                     CacheMismatchError, as_inputs, dataset_fingerprint, encode, feature_infos, file_sha256,
                     key_difference, layout_of, make_view_seeds, manifest_key, read_manifest, teacher_fingerprint,
                     teacher_module, verify_checksums)

#: A build commits its progress (flushes the arrays, then writes ``progress.json``) at
#: least this often, in seconds, and whenever it stops on an exception.
COMMIT_INTERVAL_S = 5.0


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
    module = teacher_module(teacher)
    features = sorted(set([features] if isinstance(features, str) else features))
    inputs = as_inputs(x)
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
    rows = encode(logits, captured, features, mode, k, temps, dtype, 0)
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



def build_cache(teacher: nn.Module, x: torch.Tensor | np.ndarray, path: str | os.PathLike, **settings: Any) -> Path:
    """Build the cache :meth:`~kdistill.teacher.TeacherCache.build` describes, taking turns
    with other builds of ``path``.

    Args:
        teacher, x, path: as for :meth:`~kdistill.teacher.TeacherCache.build`.
        **settings: every keyword of :meth:`~kdistill.teacher.TeacherCache.build` (that
            method owns their defaults).

    Returns:
        The finished cache directory (built now, or found there with the same teacher,
        data and settings and its checksums verified).
    """
    with _build_lock(Path(path)):
        return _build_here(teacher, x, path, **settings)


def _build_here(teacher: nn.Module, x: torch.Tensor | np.ndarray, path: str | os.PathLike, *, mode: str,
                k: int | None, dtype: str, batch_size: int, features: Iterable[str],
                device: str | torch.device | None, dataset_name: str | None, tail_temperatures: Iterable[float],
                views: int, augment: Any, seed: int, overwrite: bool, resume: bool) -> Path:
    """:func:`build_cache` in this process (holding the lock)."""
    from ... import __version__
    from ...runtime import get_device

    # 1. check the arguments
    module = teacher_module(teacher)
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
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
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
        from ...data.augment import check_seeded

        check_seeded(augment)
        aug_spec = json.loads(json.dumps(augment.to_config()))
    elif augment is not None:
        raise ValueError(
            "augment= is only used with views=V >= 1 (the number of augmented views to store per sample); "
            "pass views, or leave augment out to cache the un-augmented samples")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    inputs = as_inputs(x)
    n = int(inputs.shape[0])
    total = n * max(views, 1)  # rows of every output array
    if views:
        view_seeds = make_view_seeds(seed, views, n)
    path = Path(path)
    from ..live import LiveTeacher

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
                manifest = read_manifest(path)
                existing = manifest_key(manifest)
                if existing == key:
                    verify_checksums(path, manifest)  # a damaged one is rebuilt with overwrite
                    return path
            except CacheError:
                if not overwrite:
                    raise  # damaged: the message says to rebuild (overwrite=True)
            else:
                if not overwrite:
                    raise CacheMismatchError(
                        f"{path} already holds a teacher cache of other {key_difference(existing, key)}; "
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
                rows = encode(logits, captured, features, mode, k, tail_temperatures, dtype, i0)
                if arrays is None:
                    layout, logits_shape = layout_of(rows, features), list(logits.shape[1:])
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
            "sha256": file_sha256(f),
        }
    if views:
        f = tmp / VIEW_SEEDS
        np.save(f, view_seeds, allow_pickle=False)
        files[VIEW_SEEDS] = {"role": "view_seeds", "dtype": view_seeds.dtype.str, "shape": [views, n],
                             "bytes_per_sample": 8 * views, "bytes": f.stat().st_size, "sha256": file_sha256(f)}
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
        "features": {name: info["shape"] for name, info in feature_infos(layout).items()},
        "views": views,
        "augment": aug_spec,
        "view_seed": seed if views else None,
        "files": files,
        "bytes_per_sample": sum(info["bytes_per_sample"] for info in files.values()),
    }
    _publish(tmp, path, manifest, replace=replace)
    return path


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


def _publish(tmp: Path, path: Path, manifest: dict, *, replace: bool) -> None:
    """End a build: the manifest written last (a folder without one is unfinished), the
    progress record dropped, then the folder renamed into place; a cache it replaces is
    moved aside first and removed after, so ``path`` always holds a whole cache."""
    atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    (tmp / PROGRESS).unlink(missing_ok=True)
    fsync_dir(tmp)
    if replace:
        old = path.with_name(f"{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    fsync_dir(path.parent)
