"""The per-step cost of kdistill's cached distillation against plain PyTorch doing the same work.

Both sides run in one process, interleaved repeat by repeat (machine noise hits both alike),
on the same data, model, optimizer and loss, with the teacher's logits in a cache:

* ``step``: one training step. kdistill: ``Distiller.train_step`` with a float16
  :class:`~kdistill.teacher.TeacherCache` (rows looked up by ``batch.index``). Plain: the
  loop a user writes by hand, float16 logits held in a RAM tensor and indexed, then
  ``alpha * CE + (1 - alpha) * T^2 * KL`` (``F.kl_div`` on log-probabilities), backward,
  Adam step. Ratio = plain time / kdistill time (1.0: no cost).
* ``epoch``: one whole epoch. kdistill: ``Distiller.fit(x, y, epochs=1)`` (shuffling,
  batching, logs, history, progress off). Plain: a shuffled permutation, slicing, the
  same step, a running mean of the loss read with ``loss.item()`` each step.
* ``build``: building the cache of the teacher's logits against a plain inference loop of
  the same teacher at the same batch size and memory format (channels-last for a
  convolutional teacher on the CPU, as the cache build runs it). Ratio = plain time /
  build time.

Two students: ``small`` (an MLP, a step of a few milliseconds on a 2-core CPU) and
``classic`` (the Keras example's CNN student). Medians over ``--repeats``.

Reading the loss, and why the plain loop does too. kdistill reads every step's loss
terms once, before the optimizer step: it must, to stop on a NaN/inf loss with the weights
still finite, and the same values are then logged (History, callbacks). A plain loop that
logs its loss reads it once per step as well (``running += loss.item()``, the PyTorch
tutorials' loop), so the plain *epoch* does exactly that: same reads on both sides. The
plain *step* returns its loss without reading it (the bare arithmetic: the harder
comparison for kdistill). On the CPU a read synchronises nothing; it is one ``item()``.

    python benchmarks/step_cost.py [--repeats 200] [--threads N] [--out benchmarks/results/step_cost_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _results import stamp, package_source  # noqa: E402

from kdistill import Distiller, build_model  # noqa: E402
from kdistill.atomic import atomic_write_text  # noqa: E402
from kdistill.losses import KDLoss  # noqa: E402
from kdistill.outputs import Batch  # noqa: E402
from kdistill.runtime import machine_description, seed_everything  # noqa: E402
from kdistill.teacher import TeacherCache  # noqa: E402

ALPHA, T = 0.1, 4.0
STUDENTS = {"small": ("mlp", {"hidden": [512, 256]}), "classic": ("classic_student", {})}


def plain_step(student, opt, xb, yb, zt):
    """The hand-written cached-KD step: what kdistill's step is compared with."""
    out = student(xb)
    ce = F.cross_entropy(out, yb)
    kl = F.kl_div(F.log_softmax(out / T, -1), F.log_softmax(zt.float() / T, -1), reduction="batchmean",
                  log_target=True)
    loss = ALPHA * ce + (1 - ALPHA) * T * T * kl
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


def plain_epoch(student, opt, x, y, logits, batch_size, gen):
    """One epoch of the plain loop, logging the running mean of its loss (one read a step)."""
    perm = torch.randperm(len(x), generator=gen)
    total, n = 0.0, 0
    for i in range(0, len(x), batch_size):
        idx = perm[i:i + batch_size]
        loss = plain_step(student, opt, x[idx], y[idx], logits.index_select(0, idx))
        total += loss.item() * len(idx)
        n += len(idx)
    return total / n


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure_student(name: str, x, y, cache, logits_ram, args) -> dict:
    builder, kwargs = STUDENTS[name]
    seed_everything(0)
    s_plain = build_model(builder, num_classes=10, **kwargs)
    s_kd = build_model(builder, num_classes=10, **kwargs)
    s_kd.load_state_dict(s_plain.state_dict())
    opt_plain = torch.optim.Adam(s_plain.parameters(), lr=1e-3)
    dist = Distiller(s_kd, teacher=cache, device="cpu")
    dist.compile(torch.optim.Adam(s_kd.parameters(), lr=1e-3), distillation_loss_fn=KDLoss(temperature=T),
                 alpha=ALPHA)
    b = args.batch_size
    g = torch.Generator().manual_seed(1)
    batches = [torch.randperm(len(x), generator=g)[:b] for _ in range(args.repeats + args.warmup)]
    step_plain, step_kd = [], []
    s_plain.train()
    s_kd.train()
    for i, idx in enumerate(batches):  # interleaved, alternating which side goes first
        xb, yb = x[idx], y[idx]
        batch = Batch(xb, yb, idx)
        sides = [("plain", lambda: plain_step(s_plain, opt_plain, xb, yb, logits_ram.index_select(0, idx))),
                 ("kd", lambda: dist.train_step(batch))]
        for side, fn in (sides if i % 2 == 0 else sides[::-1]):
            dt = timed(fn)
            if i >= args.warmup:
                (step_plain if side == "plain" else step_kd).append(dt)
    epoch_plain, epoch_kd = [], []
    gen = torch.Generator().manual_seed(2)
    for i in range(args.epoch_repeats):
        sides = [("plain", lambda: plain_epoch(s_plain, opt_plain, x, y, logits_ram, b, gen)),
                 ("kd", lambda: dist.fit(x, y, epochs=1, batch_size=b, verbose=0, seed=i))]
        for side, fn in (sides if i % 2 == 0 else sides[::-1]):
            (epoch_plain if side == "plain" else epoch_kd).append(timed(fn))
    med = statistics.median
    return {
        "student": builder, "student_kwargs": kwargs,
        "step_seconds": {"plain": med(step_plain), "kdistill": med(step_kd)},
        "step_ratio": med(step_plain) / med(step_kd),
        "epoch_seconds": {"plain": med(epoch_plain), "kdistill": med(epoch_kd)},
        "epoch_ratio": med(epoch_plain) / med(epoch_kd),
        "epochs": {"plain": epoch_plain, "kdistill": epoch_kd},
    }


def measure_build(teacher, x, args) -> dict:
    b = args.build_batch_size
    cl = any(isinstance(m, torch.nn.Conv2d) for m in teacher.modules())
    plain_teacher = build_model("classic_teacher")
    plain_teacher.load_state_dict(teacher.state_dict())
    plain_teacher.eval().requires_grad_(False)
    if cl:
        plain_teacher.to(memory_format=torch.channels_last)

    def plain():
        with torch.inference_mode():
            for i in range(0, len(x), b):
                xb = x[i:i + b]
                plain_teacher(xb.contiguous(memory_format=torch.channels_last) if cl else xb).float().cpu()

    builds, plains = [], []
    with tempfile.TemporaryDirectory() as d:
        for i in range(args.build_repeats):
            path = Path(d) / f"c{i}"
            sides = [("plain", plain),
                     ("build", lambda: TeacherCache.build(teacher, x, path, batch_size=b, device="cpu"))]
            for side, fn in (sides if i % 2 == 0 else sides[::-1]):
                (plains if side == "plain" else builds).append(timed(fn))
    med = statistics.median
    return {"batch_size": b, "samples": len(x), "channels_last": cl,
            "seconds": {"plain_inference": med(plains), "build": med(builds)},
            "ratio": med(plains) / med(builds), "rounds": {"plain_inference": plains, "build": builds}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=4096, help="random 28x28 images (speed does not depend on them)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=200, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--epoch-repeats", type=int, default=15)
    p.add_argument("--build-batch-size", type=int, default=256)
    p.add_argument("--build-repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_cost_cpu.json"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    # 1. data, teacher, one float16 cache (kdistill side) and the same logits in RAM (plain side)
    seed_everything(0)
    x = torch.rand(args.samples, 1, 28, 28)
    y = torch.randint(0, 10, (args.samples,))
    teacher = build_model("classic_teacher").eval()
    with tempfile.TemporaryDirectory() as d:
        cache = TeacherCache.build(teacher, x, Path(d) / "cache", dtype="float16", device="cpu")
        logits_ram = torch.from_numpy(cache._arrays["logits.npy"][:].copy())  # (N, C) float16 in RAM
        results = {"benchmark": "step_cost", "settings": {k: v for k, v in vars(args).items() if k != "out"},
                   "kdistill": package_source(), "alpha": ALPHA, "temperature": T, "students": {}}
        # 2. steps and epochs, per student
        for name in args.students:
            results["students"][name] = measure_student(name, x, y, cache, logits_ram, args)
            r = results["students"][name]
            print(f"{name}: step plain {1e3 * r['step_seconds']['plain']:.2f} ms, kdistill "
                  f"{1e3 * r['step_seconds']['kdistill']:.2f} ms, ratio {r['step_ratio']:.3f}; epoch ratio "
                  f"{r['epoch_ratio']:.3f}", flush=True)
    # 3. the cache build against plain inference
    results["build"] = measure_build(teacher, x, args)
    print(f"build: ratio {results['build']['ratio']:.3f}")
    stamp(results, wall_seconds=time.perf_counter() - started, machine=machine_description())
    atomic_write_text(Path(args.out), json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
