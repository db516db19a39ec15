"""Multi-process data-parallel throughput: 1 process against 2, on this machine's CPUs.

The driver (the default mode) launches this file under torchrun,
``python -m torch.distributed.run --standalone --nproc-per-node N ddp_throughput.py --worker``,
for three configurations, each ``--repeats`` times, interleaved so the machine's noise hits
them alike (medians are reported):

* ``1p1t``: 1 process x 1 thread (no process group: a plain single-process ``fit``);
* ``1p2t``: 1 process x 2 threads: the fair single-process baseline on a 2-core machine
  (torchrun gives each of N > 1 processes ``OMP_NUM_THREADS=1``, so 2 processes x 1 thread
  use the same cores as 1 process x 2 threads);
* ``2p1t``: 2 processes x 1 thread: Gloo on the CPU, the student wrapped in
  ``DistributedDataParallel``, ``batch_size`` the *global* batch (each process takes half).

The worker sets ``torch.set_num_threads`` from ``--threads`` (the driver sets
``OMP_NUM_THREADS`` to match), builds the classic Keras-example models (teacher weights
from ``benchmarks/.cache/classic_teacher.pt`` when present: speed does not depend on them)
and random images ``(N, 1, 28, 28)`` from a fixed seed, identical in every process. For
each case it runs a warm-up ``fit`` (1 epoch on a small slice), then times
``fit(x, y, epochs=E, batch_size=GLOBAL, seed=0, verbose=0)`` on every process from a common
barrier, takes the slowest process's wall time (max across ranks) and reports the global
throughput ``samples * epochs / wall``:

* ``live``: ``Distiller(student, teacher).compile("adam", alpha=0.1, temperature=4)`` with
  the live teacher (online distillation: dominated by the teacher's forward pass; fewer
  samples, ``--live-samples``);
* ``cached``: the same Distiller with an offline teacher cache (full float16 logits), which
  rank 0 builds before timing (into a directory the driver shares between launches, so it
  is built once and then only reopened and verified) while the other ranks wait at a
  barrier and then open it: distillation then costs about a plain student step;
* ``plain``: plain student training (``Trainer(student).compile("adam")``), for reference.

The JSON (``--out``) holds samples/s per configuration and case (median and every repeat),
the ratios 2p1t/1p2t (the honest figure on 2 cores: same cores, processes instead of
threads), 2p1t/1p1t and 1p2t/1p1t, the global batch, samples and epochs, and the machine.
Fit times include what a ``fit`` call does besides steps (wrapping in DDP, which broadcasts
rank 0's weights; reducing epoch logs), not process start-up, imports or the cache build.
On a machine with 2 cores, expect little or no gain: data parallelism across processes
uses the same cores as intra-op threads, and adds a gradient all-reduce per step.

    python benchmarks/ddp_throughput.py [--repeats 3] [--batch-size 64] [--samples 8192] [--epochs 2]
        [--live-samples 1536] [--out benchmarks/results/ddp_throughput.json]
    python benchmarks/ddp_throughput.py --quick   # smoke run (1-2 min); writes to the temp directory

Run it on a quiet machine: the load average before and after is recorded in the JSON; with
other work running, 2 threads per process can come out several times *slower* than 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULT_PREFIX = "DDP_THROUGHPUT_RESULT "
#: (name, processes, threads per process)
CONFIGS = (("1p1t", 1, 1), ("1p2t", 1, 2), ("2p1t", 2, 1))
CASES = ("live", "cached", "plain")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=64, help="the GLOBAL batch (split across processes)")
    p.add_argument("--samples", type=int, default=8192, help="random images for the cached and plain cases")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs for the cached and plain cases")
    p.add_argument("--live-samples", type=int, default=1536, help="images for the live-teacher case (the slow one)")
    p.add_argument("--live-epochs", type=int, default=1)
    p.add_argument("--warmup-batches", type=int, default=4, help="warm-up fit: 1 epoch on this many global batches")
    p.add_argument("--repeats", type=int, default=3, help="launches per configuration (medians reported)")
    p.add_argument("--teacher-checkpoint", default=str(HERE / ".cache" / "classic_teacher.pt"),
                   help="a trained classic_teacher (random weights if missing: speed does not depend on them)")
    p.add_argument("--launch-timeout", type=float, default=900.0, help="seconds one torchrun launch may take")
    p.add_argument("--quick", action="store_true", help="a smoke run: few samples, 1 epoch, 1 repeat")
    p.add_argument("--out", default=None, help="default benchmarks/results/ddp_throughput.json; with --quick, "
                   "ddp_throughput_quick.json in the temp directory (smoke numbers stay out of results/)")
    # worker mode (the driver passes these)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.samples, args.epochs, args.live_samples, args.live_epochs = 1024, 1, 256, 1
        args.warmup_batches, args.repeats = 2, 1
    if args.out is None:
        args.out = str(Path(tempfile.gettempdir()) / "ddp_throughput_quick.json" if args.quick
                       else HERE / "results" / "ddp_throughput.json")
    return args


# ---------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> None:
    """One process of a launch: time the three cases, rank 0 prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)

    from kdistill import Distiller, Trainer, build_model, load_checkpoint
    from kdistill import distributed
    from kdistill.runtime import seed_everything
    from kdistill.teacher import TeacherCache

    distributed.init(backend="gloo")  # CPU data parallelism, even where there is a GPU
    world, rank = distributed.world_size(), distributed.rank()

    # 1. models and data, identical in every process
    seed_everything(0)
    teacher = build_model("classic_teacher")
    if Path(args.teacher_checkpoint).is_file():
        load_checkpoint(args.teacher_checkpoint, teacher)
    g = torch.Generator().manual_seed(1234)
    x = torch.rand(args.samples, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.samples,), generator=g)
    n_live = min(args.live_samples, args.samples)
    n_warm = min(args.warmup_batches * args.batch_size, args.samples)

    # 2. the teacher cache: rank 0 builds (or reopens) it, the others wait, then open it
    own_dir = args.cache_dir is None
    cache_root = Path(distributed.broadcast_object(
        tempfile.mkdtemp(prefix="kdistill-ddp-bench-") if own_dir and rank == 0 else args.cache_dir))
    cache_path = cache_root / f"classic_teacher_full_f16_{args.samples}"
    start = time.perf_counter()
    if rank == 0:
        cache = TeacherCache.build(teacher, x, cache_path, mode="full", dtype="float16", device="cpu")
    distributed.barrier()
    if rank != 0:
        cache = TeacherCache.open(cache_path)
    cache_seconds = time.perf_counter() - start

    # 3. the cases: warm-up fit, then the timed fit between barriers; the slowest process counts
    def student():
        seed_everything(0)
        return build_model("classic_student")

    def make(case: str):
        if case == "plain":
            return Trainer(student(), device="cpu").compile("adam")
        return Distiller(student(), teacher if case == "live" else cache, device="cpu").compile(
            "adam", alpha=0.1, temperature=4)

    results = {}
    for case in CASES:
        n, epochs = (n_live, args.live_epochs) if case == "live" else (args.samples, args.epochs)
        trainer = make(case)
        trainer.fit(x[:n_warm], y[:n_warm], epochs=1, batch_size=args.batch_size, seed=0, verbose=0)
        distributed.barrier()
        start = time.perf_counter()
        trainer.fit(x[:n], y[:n], epochs=epochs, batch_size=args.batch_size, seed=0, verbose=0)
        wall = time.perf_counter() - start
        walls = distributed.all_gather_object(wall)
        results[case] = {"samples": n, "epochs": epochs, "wall_seconds": max(walls), "rank_wall_seconds": walls,
                         "samples_per_second": n * epochs / max(walls),
                         "final_loss": trainer.history.history["loss"][-1]}

    distributed.barrier()
    if rank == 0:
        if own_dir:
            shutil.rmtree(cache_root, ignore_errors=True)
        line = {"world_size": world, "threads": torch.get_num_threads(), "batch_size": args.batch_size,
                "cache_build_or_open_seconds": cache_seconds, "cases": results}
        print(RESULT_PREFIX + json.dumps(line), flush=True)
    if distributed.is_distributed():
        import torch.distributed as dist

        dist.destroy_process_group()


# ---------------------------------------------------------------------------- driver
def launch(args: argparse.Namespace, nproc: int, threads: int, cache_dir: str) -> dict:
    """Run one torchrun launch of the worker and return rank 0's JSON line."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(Path(__file__).resolve()), "--worker", "--threads", str(threads), "--cache-dir", cache_dir,
           "--batch-size", str(args.batch_size), "--samples", str(args.samples), "--epochs", str(args.epochs),
           "--live-samples", str(args.live_samples), "--live-epochs", str(args.live_epochs),
           "--warmup-batches", str(args.warmup_batches), "--teacher-checkpoint", args.teacher_checkpoint]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))  # also silences torchrun's OMP_NUM_THREADS=1 warning
    env.setdefault("KDISTILL_DIST_TIMEOUT", "300")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.launch_timeout)
    lines = [ln[len(RESULT_PREFIX):] for ln in proc.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or len(lines) != 1:
        sys.stderr.write(f"launch failed (exit {proc.returncode}): {' '.join(cmd)}\n--- stdout\n{proc.stdout[-4000:]}"
                         f"\n--- stderr\n{proc.stderr[-8000:]}\n")
        raise SystemExit(1)
    return json.loads(lines[0])


def driver(args: argparse.Namespace) -> None:
    from kdistill.atomic import atomic_write_text
    from kdistill.runtime import machine_description

    started, load_before = time.perf_counter(), os.getloadavg()
    cache_dir = tempfile.mkdtemp(prefix="kdistill-ddp-bench-")
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in CONFIGS}
    try:
        for r in range(args.repeats):  # interleaved: each repeat runs every configuration once
            for name, nproc, threads in CONFIGS:
                t0 = time.perf_counter()
                line = launch(args, nproc, threads, cache_dir)
                line["launch_seconds"] = time.perf_counter() - t0
                runs[name].append(line)
                print(f"repeat {r + 1}/{args.repeats} {name}: " + ", ".join(
                    f"{c} {line['cases'][c]['samples_per_second']:.0f}/s" for c in CASES), flush=True)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)

    sps = {name: {c: statistics.median(run["cases"][c]["samples_per_second"] for run in runs[name]) for c in CASES}
           for name in runs}

    def ratio(a: str, b: str) -> dict[str, float]:
        return {c: sps[a][c] / sps[b][c] for c in CASES}

    result = {
        "benchmark": "ddp_throughput",
        "quick": args.quick,
        "what": "global samples/s of fit() (median over repeats; each the slowest process's wall time), "
                "classic Keras-example teacher/student on random 1x28x28 images, CPU, Gloo",
        "configurations": {name: {"processes": n, "threads_per_process": t} for name, n, t in CONFIGS},
        "global_batch_size": args.batch_size,
        "per_process_batch_size": {name: args.batch_size // n for name, n, _ in CONFIGS},
        "samples": {"live": min(args.live_samples, args.samples), "cached": args.samples, "plain": args.samples},
        "epochs": {"live": args.live_epochs, "cached": args.epochs, "plain": args.epochs},
        "warmup": f"1 epoch on {min(args.warmup_batches * args.batch_size, args.samples)} samples before each timed fit",
        "repeats": args.repeats,
        "samples_per_second": sps,
        "ratios": {
            "2p1t_over_1p2t": ratio("2p1t", "1p2t"),
            "2p1t_over_1p1t": ratio("2p1t", "1p1t"),
            "1p2t_over_1p1t": ratio("1p2t", "1p1t"),
            "cached_over_plain": {name: sps[name]["cached"] / sps[name]["plain"] for name in sps},
            "cached_over_live": {name: sps[name]["cached"] / sps[name]["live"] for name in sps},
        },
        "samples_per_second_each_repeat": {
            name: {c: [run["cases"][c]["samples_per_second"] for run in runs[name]] for c in CASES} for name in runs},
        "rank_wall_seconds_each_repeat": {
            name: {c: [run["cases"][c]["rank_wall_seconds"] for run in runs[name]] for c in CASES} for name in runs},
        "final_loss_each_repeat": {
            name: {c: [run["cases"][c]["final_loss"] for run in runs[name]] for c in CASES} for name in runs},
        "launch_seconds_each_repeat": {name: [run["launch_seconds"] for run in runs[name]] for name in runs},
        "cache_build_or_open_seconds_each_launch": {
            name: [run["cache_build_or_open_seconds"] for run in runs[name]] for name in runs},
        "benchmark_seconds": time.perf_counter() - started,
        # other work on the machine skews these figures (threads suffer most): check before trusting them
        "load_average_1_5_15min": {"before": list(load_before), "after": list(os.getloadavg())},
        "machine": machine_description(),
    }
    atomic_write_text(args.out, json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("samples_per_second", "ratios", "benchmark_seconds")}, indent=1))
    print(f"wrote {args.out}")


def main() -> None:
    args = parse_args()
    if args.batch_size % 2:
        raise SystemExit(f"--batch-size must be even (split across 2 processes), got {args.batch_size}")
    worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    main()
