"""What the live teacher's speed options buy: channels-last, bfloat16 autocast, torch.compile.

In one process, on the CPU (``--device``), timed interleaved after warm-up (medians), for
``classic_teacher`` (the Keras example's 1.4M-parameter CNN, 1x28x28; trained weights from
``benchmarks/.cache/classic_teacher.pt`` when present) and ``resnet32x4`` (CRD's 7.4M
parameter CIFAR teacher, 100 classes, 3x32x32), at batches 64 and 256:

* the teacher forward as :class:`~kdistill.teacher.LiveTeacher` runs it (inference mode,
  outputs cloned out), for ``plain`` (all options off), ``channels_last``, ``bf16``
  (autocast bfloat16), ``channels_last_bf16`` and ``compile`` (torch.compile, default
  backend): samples/s, the ratio to ``plain`` and the largest absolute difference of the
  logits from ``plain``'s on the same batch;
* a whole online ``Distiller.train_step`` (classic student, batch 64) with the teacher
  plain, with LiveTeacher's defaults, and with the fastest option set measured above.

Every variant first runs once on a small probe batch (``--probe-batch``); a variant more
than ``--slow-factor`` times slower per sample than ``plain`` there is not timed at the full
batches (on a CPU without native bfloat16 a bf16 forward of resnet32x4 at batch 256 alone
would take minutes); its probe numbers are reported instead. ``compile`` skips the probe
(it would compile for that shape too) and reports its first-call (compilation) time. The
number of timed rounds per batch is what ``--budget`` seconds allow, between
``--min-repeats`` and ``--repeats``. Ratios are meaningful within one run; absolute numbers
move with whatever else the machine is doing.

    python benchmarks/live_teacher_speed.py [--batches 64 256] [--repeats 15] [--budget 25] [--no-compile]
        [--out benchmarks/results/live_teacher_speed.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings
from pathlib import Path

import torch

from kdistill import Distiller, Trainer, build_model, load_checkpoint
from kdistill.atomic import atomic_write_text
from kdistill.outputs import Batch
from kdistill.runtime import machine_description, seed_everything
from kdistill.teacher import LiveTeacher

HERE = Path(__file__).parent

MODELS = {
    "classic_teacher": ({}, (1, 28, 28)),
    "resnet32x4": ({"num_classes": 100, "in_channels": 3, "input_size": 32}, (3, 32, 32)),
}
VARIANTS = {
    "plain": {"channels_last": False},
    "channels_last": {"channels_last": True},
    "bf16": {"channels_last": False, "autocast": "bfloat16"},
    "channels_last_bf16": {"channels_last": True, "autocast": "bfloat16"},
    "compile": {"channels_last": False, "compile": True},
}


def timed(teacher: LiveTeacher, batch: Batch) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    logits = teacher(batch).logits
    return time.perf_counter() - start, logits


def bench_model(name: str, args, variants: dict) -> dict:
    # 1. the model, one LiveTeacher per variant (each on its own copy: options convert in place)
    kwargs, shape = MODELS[name]
    seed_everything(0)
    module = build_model(name, **kwargs)
    checkpoint = None
    if name == "classic_teacher" and Path(args.teacher_checkpoint).is_file():
        load_checkpoint(args.teacher_checkpoint, module)
        checkpoint = str(args.teacher_checkpoint)
    compile_warnings: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        teachers = {v: LiveTeacher(copy.deepcopy(module), args.device, **opts) for v, opts in variants.items()}
    compile_warnings += [str(w.message) for w in caught]
    x = torch.rand(max(args.batches + [args.probe_batch]), *shape, generator=torch.Generator().manual_seed(1))
    out: dict = {"parameters": sum(p.numel() for p in module.parameters()), "input_shape": list(shape),
                 "checkpoint": checkpoint, "options": {v: repr(t) for v, t in teachers.items()}}

    # 2. the probe: one warm call and one timed call per variant on a small batch
    probe = Batch(x[: args.probe_batch].to(args.device), None, None)
    probe_t, probe_logits, skipped = {}, {}, {}
    for v, t in teachers.items():
        if v == "compile":
            continue
        timed(t, probe)
        probe_t[v], probe_logits[v] = timed(t, probe)
    out["probe"] = {
        "batch_size": args.probe_batch,
        "samples_per_second": {v: args.probe_batch / s for v, s in probe_t.items()},
        "ratio_to_plain": {v: probe_t["plain"] / s for v, s in probe_t.items()},
        "max_abs_logit_diff": {v: (probe_logits[v] - probe_logits["plain"]).abs().max().item() for v in probe_logits},
    }
    for v, s in probe_t.items():
        if args.slow_factor > 0 and s > args.slow_factor * probe_t["plain"]:
            skipped[v] = (f"{s / probe_t['plain']:.1f}x slower than plain per sample on the probe batch of "
                          f"{args.probe_batch} (> --slow-factor {args.slow_factor}); not timed at full batches")
    out["skipped"] = skipped
    timed_variants = [v for v in teachers if v not in skipped]

    # 3. each batch size: warm-up (compile compiles here), then interleaved rounds
    out["batches"] = {}
    for bs in args.batches:
        batch = Batch(x[:bs].to(args.device), None, None)
        warm, logits = {}, {}
        for v in list(timed_variants):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                warm[v], logits[v] = timed(teachers[v], batch)
                if v == "compile":  # the first call of a new shape runs eagerly; the second compiles
                    first = warm[v]
                    warm[v], logits[v] = timed(teachers[v], batch)
                    warm[v] += first
            compile_warnings += [str(w.message) for w in caught]
        if "compile" in timed_variants and teachers["compile"].compile_error:
            skipped["compile"] = f"torch.compile failed here ({teachers['compile'].compile_error}); ran eagerly"
            timed_variants.remove("compile")
        round_estimate = warm["plain"] * len(timed_variants)
        rounds = int(max(args.min_repeats, min(args.repeats, args.budget // max(round_estimate, 1e-9))))
        times: dict[str, list[float]] = {v: [] for v in timed_variants}
        for r in range(rounds):
            order = timed_variants[r % len(timed_variants):] + timed_variants[: r % len(timed_variants)]
            for v in order:
                times[v].append(timed(teachers[v], batch)[0])
        med = {v: statistics.median(ts) for v, ts in times.items()}
        out["batches"][str(bs)] = {
            "repeats": rounds,
            "median_seconds": med,
            "samples_per_second": {v: bs / s for v, s in med.items()},
            "ratio_to_plain": {v: med["plain"] / s for v, s in med.items()},
            "max_abs_logit_diff": {v: (logits[v] - logits["plain"]).abs().max().item() for v in timed_variants},
            "warmup_seconds": warm,
        }
        print(f"{name} batch {bs} ({rounds} rounds): " + ", ".join(
            f"{v} {bs / s:.0f}/s x{med['plain'] / s:.2f}" for v, s in med.items()), flush=True)
    out["warnings"] = sorted(set(compile_warnings))
    return out


def bench_train_step(args, best: dict, teacher_module: torch.nn.Module) -> dict:
    """Whole online distillation steps: classic student, the classic teacher live."""
    seed_everything(0)
    student = build_model("classic_student")
    bs = args.step_batch
    x = torch.rand(bs * 8, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 10, (bs * 8,), generator=torch.Generator().manual_seed(3))
    batches = [Batch(x[i * bs:(i + 1) * bs], y[i * bs:(i + 1) * bs], torch.arange(i * bs, (i + 1) * bs)) for i in range(8)]

    def distiller(**opts):
        t = LiveTeacher(copy.deepcopy(teacher_module), args.device, **opts)
        d = Distiller(student=copy.deepcopy(student), teacher=t, device=args.device)
        return d.compile("adam", alpha=0.1, temperature=4), repr(t)

    cases, options = {}, {}
    cases["student_only"] = Trainer(copy.deepcopy(student), device=args.device).compile("adam")
    options["student_only"] = "no teacher (plain training step of the student)"
    cases["plain"], options["plain"] = distiller(channels_last=False)
    cases["default"], options["default"] = distiller()
    if best["options"] not in ({"channels_last": False}, {"channels_last": True}):  # else: default already is it
        cases["best"], options["best"] = distiller(**best["options"])
    times: dict[str, list[float]] = {k: [] for k in cases}
    for r in range(args.step_repeats + 3):
        batch = batches[r % len(batches)]
        for name, trainer in cases.items():
            start = time.perf_counter()
            trainer.train_step(batch)
            if r >= 3:  # warm-up (a compiled teacher compiles here)
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "batch_size": bs,
        "repeats": args.step_repeats,
        "teachers": options,
        "best_from_forward_benchmark": best,
        "median_step_seconds": med,
        "samples_per_second": {k: bs / v for k, v in med.items()},
        "ratio_to_plain": {k: med["plain"] / v for k, v in med.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batches", nargs="+", type=int, default=[64, 256])
    p.add_argument("--probe-batch", type=int, default=8)
    p.add_argument("--slow-factor", type=float, default=2.0,
                   help="skip full-batch timing of variants this many times slower than plain on the probe (0: time all)")
    p.add_argument("--repeats", type=int, default=15, help="at most this many timed rounds per batch size")
    p.add_argument("--min-repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=25.0, help="seconds of timed rounds per model and batch size")
    p.add_argument("--step-batch", type=int, default=64)
    p.add_argument("--step-repeats", type=int, default=10)
    p.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    p.add_argument("--device", default="cpu")
    p.add_argument("--teacher-checkpoint", default=str(HERE / ".cache" / "classic_teacher.pt"),
                   help="a trained classic_teacher (random weights if missing: speed does not depend on them)")
    p.add_argument("--out", default=str(HERE / "results" / "live_teacher_speed.json"))
    args = p.parse_args()
    started = time.perf_counter()
    variants = {k: v for k, v in VARIANTS.items() if not (args.no_compile and k == "compile")}

    # 1. teacher forwards, per model
    models = {name: bench_model(name, args, variants) for name in args.models}

    # 2. the fastest option set on the classic teacher at the step batch (or the largest measured)
    ref = models.get("classic_teacher")
    best = {"variant": "plain", "options": VARIANTS["plain"]}
    if ref is not None:
        key = str(args.step_batch) if str(args.step_batch) in ref["batches"] else str(max(args.batches))
        sps = ref["batches"][key]["samples_per_second"]
        v = max(sps, key=sps.get)
        best = {"variant": v, "options": VARIANTS[v], "measured_at_batch": int(key)}
    teacher_module = build_model("classic_teacher")
    if Path(args.teacher_checkpoint).is_file():
        load_checkpoint(args.teacher_checkpoint, teacher_module)
    step = bench_train_step(args, best, teacher_module)
    print("train_step: " + ", ".join(f"{k} {v:.0f}/s x{step['ratio_to_plain'][k]:.2f}"
                                     for k, v in step["samples_per_second"].items()), flush=True)

    result = {
        "benchmark": "live_teacher_speed",
        "device": args.device,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "models": models,
        "train_step": step,
        "total_seconds": time.perf_counter() - started,
        "machine": machine_description(),
    }
    atomic_write_text(args.out, json.dumps(result, indent=1))
    print(f"total {result['total_seconds']:.0f} s; wrote {args.out}")


if __name__ == "__main__":
    main()
