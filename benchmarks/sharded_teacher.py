"""Memory per process of a teacher sharded with FSDP2 (``ShardedTeacher``) against a
replicated one (``LiveTeacher``, a whole copy in every process), on 2 CPU processes (Gloo).

The driver (the default mode) launches this file under torchrun,
``python -m torch.distributed.run --standalone --nproc-per-node 2 sharded_teacher.py --worker MODE``,
once per mode (``replicated``, ``sharded``) and per allocator setting (glibc's malloc as
it comes, and with ``MALLOC_MMAP_THRESHOLD_=131072``, under which freed blocks leave the
resident set at once). Each process:

1. builds the teacher, a random Llama causal LM from a config (default 12 blocks, hidden
   1024, vocabulary 16384: about 172M parameters, 0.66 GiB in float32), the same weights
   in every process, and a tiny student with the same vocabulary;
2. wraps the teacher (``LiveTeacher`` or ``ShardedTeacher``) and records the teacher's
   parameter bytes it holds (its shards) and its resident set size (``VmRSS``) then;
3. resets the peak resident set size (``/proc/self/clear_refs``, Linux), runs a
   ``Distiller`` fit (token KL, ``--steps`` steps of ``--batch`` sequences of ``--seq``
   tokens, the global batch) and records the peak resident set size during the fit
   (``VmHWM``); the peak before it (building the teacher) is recorded too.

The teacher is built whole in every process before it is sharded (as a user's script
does with ``from_pretrained``): the peak while building includes that whole copy in both
modes; the figures that show the sharding are the bytes held at rest and the RSS during
the fit (the sharded forward gathers one unit at a time: a block, the embeddings, the
output head, with the next one prefetched).

    python benchmarks/sharded_teacher.py [--layers 12] [--hidden 1024] [--vocab 16384]
        [--out benchmarks/results/sharded_teacher_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODES = ("replicated", "sharded")
#: glibc's malloc as it comes (a freed large block raises the mmap threshold, so later
#: blocks of that size stay in the heap after they are freed: RSS keeps them), and with a
#: fixed threshold (blocks over 128 KiB mapped and unmapped: freed memory leaves the RSS)
ALLOCATORS = {"glibc_default": {}, "mmap_threshold_128k": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--result-dir", help=argparse.SUPPRESS)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--batch", type=int, default=8, help="the GLOBAL batch of sequences")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default=str(HERE / "results" / "sharded_teacher_cpu.json"))
    return p.parse_args(argv)


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _mib(kib: int) -> float:
    return round(kib / 1024, 1)


def worker(args: argparse.Namespace) -> None:
    import torch
    import transformers

    from kdistill import Distiller, distributed
    from kdistill.losses import TokenKLLoss
    from kdistill.teacher import LiveTeacher, ShardedTeacher

    distributed.init()
    rss_start = _status_kib("VmRSS")

    def llama(layers: int, hidden: int, intermediate: int, heads: int, seed: int):
        torch.manual_seed(seed)
        config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=hidden, intermediate_size=intermediate,
                                          num_hidden_layers=layers, num_attention_heads=heads,
                                          num_key_value_heads=max(1, heads // 2), max_position_embeddings=args.seq)
        return transformers.LlamaForCausalLM(config)

    # 1. teacher (same weights everywhere) and a tiny student
    net = llama(args.layers, args.hidden, args.intermediate, 8, seed=7)
    full_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
    student = llama(1, 64, 128, 4, seed=0)
    # 2. the teacher kind under test
    if args.worker == "sharded":
        teacher = ShardedTeacher(net)
        del net
        held = teacher.local_parameter_bytes()
    else:
        teacher = LiveTeacher(net)
        held = full_bytes
    import gc

    gc.collect()
    rss_ready = _status_kib("VmRSS")
    peak_building = _status_kib("VmHWM")  # building the whole teacher (then sharding it)
    # 3. a short fit, with the peak RSS reset before it
    Path("/proc/self/clear_refs").write_text("5")
    from kdistill.outputs import next_token_targets

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, args.vocab, (args.batch * args.steps, args.seq), generator=g)
    targets = next_token_targets(ids)

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return ids.shape[0]

        def __getitem__(self, i: int) -> dict:
            return {"inputs": {"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i])}, "targets": targets[i]}

    distiller = Distiller(student=student, teacher=teacher, device="cpu")
    distiller.compile(torch.optim.SGD(student.parameters(), lr=0.1), alpha=0.5,
                      distillation_loss_fn=TokenKLLoss(temperature=2.0))
    t0 = time.perf_counter()
    distiller.fit(Rows(), epochs=1, batch_size=args.batch, shuffle=False, verbose=0)
    fit_s = time.perf_counter() - t0
    record = {
        "mode": args.worker, "rank": distributed.rank(), "world": distributed.world_size(),
        "teacher_parameters": sum(1 for _ in teacher.parameters()),
        "teacher_full_mib": round(full_bytes / 2**20, 2),
        "teacher_held_mib": round(held / 2**20, 2),
        "rss_after_imports_mib": _mib(rss_start),
        "rss_teacher_ready_mib": _mib(rss_ready),
        "peak_rss_building_mib": _mib(peak_building),
        "peak_rss_during_fit_mib": _mib(_status_kib("VmHWM")),
        "rss_after_fit_mib": _mib(_status_kib("VmRSS")),
        "fit_seconds": round(fit_s, 2),
    }
    (Path(args.result_dir) / f"{args.worker}-{distributed.rank()}.json").write_text(json.dumps(record))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(HERE))
    from _results import package_source, stamp

    from kdistill.runtime import machine_description

    started = time.perf_counter()
    settings = {k: getattr(args, k) for k in ("nproc", "layers", "hidden", "intermediate", "vocab", "batch", "seq", "steps")}
    results: dict = {"settings": settings, "allocators": {}}
    forwarded = [f"--{k}={v}" for k, v in settings.items() if k != "nproc"]
    result_dir = Path(tempfile.mkdtemp(prefix="sharded_teacher_"))
    for allocator, malloc_env in ALLOCATORS.items():
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
        env.update(malloc_env)
        results["allocators"][allocator] = _measure(args, env, forwarded, result_dir / allocator)
    results["package"] = package_source()
    stamp(results, wall_seconds=round(time.perf_counter() - started, 1), machine=machine_description())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v["summary"] for k, v in results["allocators"].items()}, indent=2))
    print(f"wrote {out}")


def _measure(args: argparse.Namespace, env: dict, forwarded: list[str], result_dir: Path) -> dict:
    """Both modes under one allocator setting: every rank's record and the per-process maxima."""
    result_dir.mkdir(parents=True)
    results: dict = {"modes": {}}
    for mode in MODES:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               str(Path(__file__).resolve()), "--worker", mode, f"--result-dir={result_dir}", *forwarded]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, cwd=tempfile.gettempdir())
        ranks = [json.loads(f.read_text()) for f in result_dir.glob(f"{mode}-*.json")]
        if proc.returncode != 0 or len(ranks) != args.nproc:
            raise SystemExit(f"{mode} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results["modes"][mode] = sorted(ranks, key=lambda r: r["rank"])
        print(mode, json.dumps(results["modes"][mode]), flush=True)
    rep, sh = results["modes"]["replicated"], results["modes"]["sharded"]
    results["summary"] = {
        "teacher_held_mib_per_process": {"replicated": max(r["teacher_held_mib"] for r in rep),
                                        "sharded": max(r["teacher_held_mib"] for r in sh)},
        "rss_teacher_ready_mib_per_process": {"replicated": max(r["rss_teacher_ready_mib"] for r in rep),
                                              "sharded": max(r["rss_teacher_ready_mib"] for r in sh)},
        "peak_rss_during_fit_mib_per_process": {"replicated": max(r["peak_rss_during_fit_mib"] for r in rep),
                                                "sharded": max(r["peak_rss_during_fit_mib"] for r in sh)},
        "peak_rss_building_mib_per_process": {"replicated": max(r["peak_rss_building_mib"] for r in rep),
                                              "sharded": max(r["peak_rss_building_mib"] for r in sh)},
        "fit_seconds": {"replicated": max(r["fit_seconds"] for r in rep), "sharded": max(r["fit_seconds"] for r in sh)},
    }
    return results


if __name__ == "__main__":
    main()
