"""Data-parallel training on ``torch.distributed``: what changes when ``torchrun`` starts
several processes, and nothing else.

Launch any kdistill program (``kdistill run``, or your own script calling ``fit``) with
``torchrun --nproc-per-node N ...``: the :class:`~kdistill.Trainer` joins the process group
torchrun describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``)
on first use, with the backend the hardware calls for (NCCL on CUDA GPUs, Gloo on CPUs)
and a timeout on every collective (:data:`DEFAULT_TIMEOUT_S`, ``$KDISTILL_DIST_TIMEOUT``),
so a process that dies never leaves the others waiting for ever. Then:

* the student (the model that trains) is wrapped in
  :class:`~torch.nn.parallel.DistributedDataParallel`; parameters a loss creates
  (adapters, embeddings) are averaged across processes after each backward pass. The
  frozen teacher is **not** wrapped (DDP refuses a module without trainable parameters):
  each process runs its own copy under inference mode, or reads a memory-mapped teacher
  cache that the operating system shares between the processes;
* ``batch_size`` is the **global** batch: each step every process takes its share
  (``batch_size / N`` samples, by position in the batch) of the batch a single process
  would take, from the same epoch-seeded permutation (like ``DistributedSampler``; the
  epoch's order is padded to a multiple of N by repeating its first samples). With the
  gradient averaged by DDP, N processes then follow the single-process run's
  optimisation (equal within float rounding, when nothing in the model depends on the
  batch's composition, e.g. batch normalisation sees only its process's share);
* epoch logs and validation metrics are reduced across processes (validation data is
  sharded too), so every process sees the same numbers and callbacks such as early
  stopping decide alike; only rank 0 runs callbacks that write or print
  (:attr:`~kdistill.callbacks.Callback.main_process_only`) and writes run directories,
  checkpoints and reports;
* a failure in the set-up on one process (a teacher/student mismatch, a missing layer) is
  shared: every process raises :class:`DistributedError` naming the rank and its error;
* processes started with different settings fail together at the start instead of
  hanging in a collective or training apart: ``fit`` compares what makes the processes'
  training identical (compile settings, epochs, batch and data sizes, the model's
  parameter shapes) and ``kdistill run`` the experiment's config and data, with
  :func:`check_agreement`, which names the keys that differ and each rank's value;
* the training logs of an epoch are summed across processes after every step
  (:class:`StepSums`, one small all-reduce), so every process holds the epoch's running
  means over all processes: a training state saved mid-epoch by rank 0 carries them, and
  a resumed run logs the epoch an uninterrupted run logs, whatever its number of
  processes.

Each process keeps its own random stream (seeded ``seed + rank``), so augmentations and
dropout differ between processes as they should. A resumed run restores rank 0's streams
on rank 0 and derives the other ranks' from them: a resumed multi-process run is as
valid as an uninterrupted one, and identical to it when training draws no random numbers;
the interrupted epoch's training logs are those of an uninterrupted run in any case (the
running means saved are already summed over the processes).
"""

from __future__ import annotations

import atexit
import gc
import hashlib
import json
import os
from datetime import timedelta
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist

from .errors import KDistillError

#: Seconds a collective may wait for the other processes before it fails
#: (``$KDISTILL_DIST_TIMEOUT`` overrides it).
DEFAULT_TIMEOUT_S = 600.0


class DistributedError(KDistillError, RuntimeError):
    """A process of a multi-process run failed; raised on every process."""


def launched() -> bool:
    """Whether this process was started as one of several (``WORLD_SIZE > 1``, as torchrun
    sets it) or is already in a process group of several."""
    if is_distributed():
        return True
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def timeout_seconds() -> float:
    """The collective timeout: ``$KDISTILL_DIST_TIMEOUT`` or :data:`DEFAULT_TIMEOUT_S`."""
    text = os.environ.get("KDISTILL_DIST_TIMEOUT")
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"KDISTILL_DIST_TIMEOUT must be a number of seconds, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"KDISTILL_DIST_TIMEOUT must be positive, got {text!r}")
    return value


def default_backend() -> str:
    """NCCL when this process has a CUDA GPU, else Gloo."""
    return "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


def init(backend: str | None = None) -> bool:
    """Join the process group torchrun describes, once; a no-op in a single process.

    Args:
        backend: ``"gloo"``, ``"nccl"``, ... (default :func:`default_backend`).

    Returns:
        Whether this process is one of several.

    Raises:
        DistributedError: torchrun's variables are incomplete (``RANK``/``MASTER_ADDR``
            missing) or ``torch.distributed`` is not available in this PyTorch build.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if not launched():
        return False
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed; run one process")
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: start the processes with "
            "torchrun (torchrun --nproc-per-node N ...), which sets them")
    backend = backend or default_backend()
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds()))
    atexit.register(_leave)  # a group left alive at exit can abort the process (Gloo's threads)
    return dist.get_world_size() > 1


def _leave() -> None:
    """Destroy the process group this module created, at interpreter exit (local: no other
    process needed).

    Garbage is collected first and again after: a DDP wrapper, its reducer and Gloo's
    pending work objects often sit in reference cycles that hold the group and tensors.
    Left to the interpreter's final teardown, Gloo's threads destroy them without a live
    interpreter and the process aborts ("terminate called without an active exception",
    exit code -6) after the run has finished.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            gc.collect()
            dist.destroy_process_group()
            gc.collect()
        except Exception:  # noqa: BLE001 - at exit, with peers possibly gone: nothing to report to
            pass


def is_distributed() -> bool:
    """Whether a process group of more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 in a single process)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 in a single process)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK``; 0 in a single process)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0, or a single process)."""
    return rank() == 0


def device() -> torch.device:
    """This process's device: its local GPU (``cuda:LOCAL_RANK``) where there are GPUs,
    else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def _comm_device() -> torch.device:
    """Where tensors for collectives live: the GPU with NCCL, the CPU with Gloo."""
    return device() if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process (picklable objects)."""
    if not is_distributed():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def sum_floats(values: dict[str, float]) -> dict[str, float]:
    """Element-wise sums across processes of ``{name: float}`` with the same keys on
    every process (sorted order), in float64."""
    if not is_distributed() or not values:
        return dict(values)
    names = sorted(values)
    t = torch.tensor([float(values[k]) for k in names], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return dict(zip(names, t.cpu().tolist()))


def reduce_weighted_means(sums: dict[str, float], weights: dict[str, float]) -> dict[str, float]:
    """Global weighted means from each process's weighted sums and weights.

    The keys may differ between processes (a process without labelled samples logs no
    accuracy): their union is reduced, a missing key counting as zero weight.
    """
    if not is_distributed():
        return {k: sums[k] / weights[k] for k in sums if weights.get(k, 0) > 0}
    keys = sorted(set().union(*all_gather_object(sorted(sums))))
    both = sum_floats({**{f"s:{k}": sums.get(k, 0.0) for k in keys}, **{f"w:{k}": weights.get(k, 0.0) for k in keys}})
    return {k: both[f"s:{k}"] / both[f"w:{k}"] for k in keys if both[f"w:{k}"] > 0}


def average_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` across processes (one flat all-reduce), for
    trainable parameters outside the DDP-wrapped model (a loss's adapters)."""
    if not is_distributed():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]).to(_comm_device())
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(g).to(g.device)
        offset += n


def broadcast_tensors(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Copy rank ``src``'s values of ``tensors`` (parameters, buffers) to every process."""
    if not is_distributed():
        return
    for t in tensors:
        buf = t.detach().to(_comm_device())
        dist.broadcast(buf, src=src)
        with torch.no_grad():
            t.copy_(buf.to(t.device))


def run_together(what: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on every process; if it raises on any of them, raise on all.

    Without this, one process failing a check (a teacher/student mismatch) leaves the
    others waiting in the next collective until the timeout.

    Raises:
        DistributedError: ``fn`` failed on some process (each failure named with its rank).
            On the failing process itself, the original exception is chained.
    """
    if not is_distributed():
        return fn()
    error: BaseException | None = None
    result = None
    try:
        result = fn()
    except Exception as e:  # shared below; KeyboardInterrupt and the like propagate
        error = e
    reports = all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
    failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
    if failed:
        lines = "\n".join(f"  rank {r}: {msg}" for r, msg in failed)
        raise DistributedError(f"{what} failed on {len(failed)} of {world_size()} processes:\n{lines}") from error
    return result


class StepSums:
    """Sums ``{name: float}`` across processes, call after call, with one all-reduce per
    call once every process's names are known.

    The names may differ between processes and calls (a process whose share of a batch
    has no labelled sample logs no accuracy): a name a process has not sent before makes
    every process agree on the union of names (one gather) and sum again; a name missing
    on a process counts as zero there. In a single process, the values are returned as
    they are.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self._known: set[str] = set()

    def __call__(self, values: Mapping[str, float]) -> dict[str, float]:
        """Every process's ``values`` summed, name by name (a collective: every process
        must call it, as often as the others)."""
        if not is_distributed():
            return dict(values)
        new = [k for k in values if k not in self._known]
        # 1. the known names, plus a count of the processes that bring new ones
        t = torch.tensor([float(values.get(k, 0.0)) for k in self.names] + [float(bool(new))],
                         dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        if t[-1].item() == 0:
            return dict(zip(self.names, t[:-1].cpu().tolist()))
        # 2. some process has new names: every process appends the union, in rank order,
        # then this call's values are summed again over the longer list
        for names in all_gather_object(new):
            for k in names:
                if k not in self._known:
                    self._known.add(k)
                    self.names.append(k)
        t = torch.tensor([float(values.get(k, 0.0)) for k in self.names], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t)
        return dict(zip(self.names, t.cpu().tolist()))


_MISSING = object()
_MAX_SHOWN = 20  # differing keys named in one message
_MAX_VALUE_CHARS = 120


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists, scalars and empty mappings are leaves."""
    if isinstance(values, Mapping) and values:
        out: dict[str, Any] = {}
        for k, v in values.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: values}


def _show(value: Any) -> str:
    if value is _MISSING:
        return "(missing)"
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= _MAX_VALUE_CHARS else text[:_MAX_VALUE_CHARS - 3] + "..."


def _ranks(ranks: Sequence[int]) -> str:
    """``[0]`` -> ``rank 0``; ``[0, 1, 2, 5]`` -> ``ranks 0-2, 5``."""
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    spans: list[list[int]] = []
    for r in ranks:
        if spans and r == spans[-1][1] + 1:
            spans[-1][1] = r
        else:
            spans.append([r, r])
    return "ranks " + ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def differences(values: Sequence[Mapping[str, Any]]) -> list[str]:
    """Where the processes' mappings differ: one line per dotted key, naming each rank's
    value (ranks with the same value grouped).

    Args:
        values: one (nested) mapping per rank, in rank order.

    Returns:
        Lines such as ``"stages.distil.epochs: rank 0 = 2, rank 1 = 3"``, in the order the
        keys first appear (rank 0's order first); empty when all mappings are equal. A
        key that a rank lacks shows ``(missing)`` for it.
    """
    flat = [_flatten(v) for v in values]
    keys: dict[str, None] = {}
    for f in flat:
        keys.update(dict.fromkeys(f))
    lines = []
    for key in keys:
        shown = [_show(f.get(key, _MISSING)) for f in flat]
        if len(set(shown)) == 1:
            continue
        groups: dict[str, list[int]] = {}
        for r, text in enumerate(shown):
            groups.setdefault(text, []).append(r)
        lines.append(f"{key}: " + ", ".join(f"{_ranks(rs)} = {text}" for text, rs in groups.items()))
    return lines


def _canonical(values: Mapping[str, Any]) -> Any:
    """``values`` as JSON reads it back (tuples as lists, other objects as their text)."""
    return json.loads(json.dumps(values, sort_keys=True, default=str))


def check_agreement(what: str, values: Mapping[str, Any]) -> None:
    """Fail on every process, at once, if the processes' ``values`` differ.

    Call it on every process, at the same point, with what must be equal across them
    (e.g. the resolved config and a fingerprint of the data): processes started with
    different settings would otherwise wait for each other in a collective until the
    timeout (another number of epochs) or train apart without a word (another
    temperature). Only a hash travels (one all-gather of 8 bytes); the values themselves
    are gathered when the hashes differ, to name what differs. A no-op in a single process.

    Args:
        what: what is compared, for the message (``"the experiment"``).
        values: a JSON-serialisable mapping, nested as you like (other objects are
            compared by their ``str``).

    Raises:
        DistributedError: on every process when any two differ, naming the dotted keys
            and each rank's value, e.g. ``ranks disagree on the experiment:
            stages.distil.epochs: rank 0 = 2, rank 1 = 3; start every process with the
            same config and data``.
    """
    init()
    if not is_distributed():
        return
    canonical = _canonical(values)
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big", signed=True)
    mine = torch.tensor([digest], dtype=torch.int64, device=_comm_device())
    hashes = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(hashes, mine)
    if all(int(h.item()) == digest for h in hashes):
        return
    lines = differences(all_gather_object(canonical))  # every process gets every mapping: all raise alike
    if len(lines) > _MAX_SHOWN:
        lines = [*lines[:_MAX_SHOWN], f"... and {len(lines) - _MAX_SHOWN} more keys"]
    raise DistributedError(f"ranks disagree on {what}: {'; '.join(lines)}; "
                           "start every process with the same config and data")
