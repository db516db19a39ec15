"""Peak memory and time of the token-level losses, chunked against unchunked.

One language-model batch of logits: ``--batch`` sequences x ``--seq`` positions x
``--vocab`` entries (default 8 x 512 x 32000: 131M logits, 0.5 GiB per float32 tensor), the
student's requiring a gradient, the teacher's fixed. For forward KL
(:func:`~kdistill.losses.token_kl_loss`) and the generalized JSD at ``beta = 0.5``
(:func:`~kdistill.losses.generalized_jsd_loss`), each computed

* ``chunked``: ``chunk_size=None`` (chunks of ``DEFAULT_CHUNK_ELEMENTS`` logits, each
  chunk's gradient written into one ``(N, V)`` buffer during the forward pass);
* ``unchunked``: ``chunk_size=0`` (plain autograd over the whole ``(N, V)`` tensors),

this measures one forward + backward (``loss.backward()``, the student's ``.grad`` set to
``None`` between runs): the peak memory above what the inputs take, and the time.

Peak memory. On the CPU each arm runs in a fresh process (two runs of forward + backward),
which reports its peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``)
minus the baseline taken after the inputs were allocated (the resident set size then, from
``/proc/self/statm``; where that file does not exist, ``ru_maxrss`` then): so the arms do not
see each other's freed pages, and the figure is the operating system's, not the
allocator's. On CUDA the arms run in this process and report
``torch.cuda.max_memory_allocated()`` above the inputs. Both arms include the student's
``.grad`` (one ``(N, V)`` float32 tensor, 0.5 GiB at the defaults), which any training step
holds.

Time. In this process, the two arms of a loss alternate run by run (which goes first
alternates too), so noise from other work on the machine hits both alike; one warm-up run
each, then the median of ``--repeats`` runs.

    OMP_NUM_THREADS=2 python benchmarks/token_loss_memory.py [--device cpu] [--repeats 5]
        [--out benchmarks/results/token_loss_memory_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _results import stamp, package_source  # noqa: E402

from kdistill.atomic import atomic_write_text  # noqa: E402
from kdistill.losses import generalized_jsd_loss, token_kl_loss  # noqa: E402
from kdistill.losses.tokens import DEFAULT_CHUNK_ELEMENTS  # noqa: E402
from kdistill.runtime import machine_description  # noqa: E402

LOSSES = {
    "forward_kl": lambda s, t, chunk: token_kl_loss(s, t, 1.0, chunk_size=chunk),
    "generalized_jsd_0.5": lambda s, t, chunk: generalized_jsd_loss(s, t, 0.5, 1.0, chunk_size=chunk),
}
ARMS = {"chunked": None, "unchunked": 0}
MIB = 2**20


def max_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int | None:
    """The resident set size now (Linux only; ``None`` elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return None
    return pages * resource.getpagesize()


def inputs(args, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    shape = (args.batch, args.seq, args.vocab)
    # in place: no temporary copy raises the peak before the baseline is taken
    student = torch.randn(shape, generator=g).mul_(2.0).to(device).requires_grad_()
    teacher = torch.randn(shape, generator=g).mul_(2.0).to(device)
    return student, teacher


def one_run(loss: str, arm: str, student: torch.Tensor, teacher: torch.Tensor, sync) -> tuple[float, float]:
    """Forward + backward once: the seconds it took and the loss."""
    fn, chunk = LOSSES[loss], ARMS[arm]
    student.grad = None
    sync()
    start = time.perf_counter()
    out = fn(student, teacher, chunk)
    out.backward()
    sync()
    seconds = time.perf_counter() - start
    return seconds, out.item()


def child(args) -> None:
    """One arm's peak memory, in this fresh process on the CPU: prints one JSON line."""
    if args.threads:
        torch.set_num_threads(args.threads)
    student, teacher = inputs(args, torch.device("cpu"))
    base_peak, base_now = max_rss_bytes(), current_rss_bytes()
    for _ in range(2):
        _, value = one_run(args.loss, args.arm, student, teacher, lambda: None)
    peak = max_rss_bytes()
    # the peak above what was resident with the inputs allocated (Linux), else above the
    # peak before the runs (the same when nothing bigger was allocated and freed before)
    print(json.dumps({
        "loss_value": value,
        "peak_extra_mib": (peak - (base_now if base_now is not None else base_peak)) / MIB,
        "peak_extra_over_baseline_max_rss_mib": (peak - base_peak) / MIB,
        "baseline_rss_mib": None if base_now is None else base_now / MIB,
        "baseline_max_rss_mib": base_peak / MIB,
    }))


def memory_cpu(args) -> dict:
    """``{loss/arm: {...}}``: each arm's peak in a fresh process."""
    out = {}
    for loss in LOSSES:
        for arm in ARMS:
            cmd = [sys.executable, __file__, "--child", "--loss", loss, "--arm", arm, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--vocab", str(args.vocab), "--threads", str(args.threads)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            out[f"{loss}/{arm}"] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"memory {loss} {arm}: {out[f'{loss}/{arm}']['peak_extra_mib']:.0f} MiB", flush=True)
    return out


def memory_cuda(args, student: torch.Tensor, teacher: torch.Tensor) -> dict:
    out = {}
    device = student.device
    for loss in LOSSES:
        for arm in ARMS:
            student.grad = None
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            _, value = one_run(loss, arm, student, teacher, torch.cuda.synchronize)
            out[f"{loss}/{arm}"] = {"loss_value": value,
                                    "peak_extra_mib": (torch.cuda.max_memory_allocated(device) - base) / MIB}
            print(f"memory {loss} {arm}: {out[f'{loss}/{arm}']['peak_extra_mib']:.0f} MiB", flush=True)
    student.grad = None
    return out


def times(args, student: torch.Tensor, teacher: torch.Tensor, sync) -> dict:
    """``{loss/arm: [seconds, ...]}``: the two arms of a loss alternating, after a warm-up run each."""
    out = {f"{loss}/{arm}": [] for loss in LOSSES for arm in ARMS}
    arms = list(ARMS)
    for loss in LOSSES:
        for arm in arms:
            one_run(loss, arm, student, teacher, sync)
        for i in range(args.repeats):
            for arm in arms if i % 2 == 0 else arms[::-1]:
                seconds, _ = one_run(loss, arm, student, teacher, sync)
                out[f"{loss}/{arm}"].append(seconds)
        print(f"time {loss}: " + ", ".join(f"{a} {statistics.median(out[f'{loss}/{a}']):.2f} s" for a in arms),
              flush=True)
    student.grad = None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--loss", choices=list(LOSSES), help=argparse.SUPPRESS)
    p.add_argument("--arm", choices=list(ARMS), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    started = time.perf_counter()
    device = torch.device(args.device)
    out = Path(args.out or Path(__file__).parent / "results" / f"token_loss_memory_{device.type}.json")

    # 1. each arm's peak memory (on the CPU in fresh processes), then the times, interleaved
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        student, teacher = inputs(args, device)
        arms = memory_cuda(args, student, teacher)
        sync = torch.cuda.synchronize
    else:
        arms = memory_cpu(args)
        student, teacher = inputs(args, device)
        sync = lambda: None  # noqa: E731
    for key, seconds in times(args, student, teacher, sync).items():
        arms[key]["seconds"] = seconds

    # 2. summary: medians, and chunked against unchunked
    n = args.batch * args.seq
    summary = {}
    for key, r in arms.items():
        r["median_seconds"] = statistics.median(r["seconds"])
    for loss in LOSSES:
        c, u = arms[f"{loss}/chunked"], arms[f"{loss}/unchunked"]
        summary[loss] = {
            "peak_extra_mib": {"chunked": c["peak_extra_mib"], "unchunked": u["peak_extra_mib"]},
            "median_seconds": {"chunked": c["median_seconds"], "unchunked": u["median_seconds"]},
            "memory_ratio_unchunked_over_chunked": u["peak_extra_mib"] / c["peak_extra_mib"],
            "time_ratio_chunked_over_unchunked": c["median_seconds"] / u["median_seconds"],
            "loss_value_difference": abs(c["loss_value"] - u["loss_value"]),
        }
    results = {
        "benchmark": "token_loss_memory",
        "settings": {"batch": args.batch, "seq": args.seq, "vocab": args.vocab, "dtype": "float32",
                     "repeats": args.repeats, "threads": args.threads, "device": str(device)},
        "kdistill": package_source(),
        "positions": n,
        "logits_per_tensor": n * args.vocab,
        "one_float32_logits_tensor_mib": n * args.vocab * 4 / MIB,
        "chunk_positions": max(1, DEFAULT_CHUNK_ELEMENTS // args.vocab),
        "note": "peak_extra_mib is the peak above the inputs during forward + backward; it includes the "
                "student's .grad (one float32 logits tensor) in both arms",
        "summary": summary,
        "arms": arms,
    }
    stamp(results, wall_seconds=time.perf_counter() - started, machine=machine_description())
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(results, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
