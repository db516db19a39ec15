"""What a distillation step costs beyond its parts.

Times, in one process and interleaved (so machine noise hits all three alike), on the
classic Keras-example models at batch 64:

* ``student_step``: a plain training step of the student (``Trainer.train_step``);
* ``teacher_forward``: the teacher's forward pass as the Distiller runs it (``LiveTeacher``);
* ``distill_step``: a full ``Distiller.train_step`` (teacher forward + student step + KD loss).

Reports medians after warm-up and ``overhead_ratio = distill_step / (student_step +
teacher_forward)``: 1.0 means distillation adds nothing beyond the teacher's own forward.
The three cases run in rotation, each repeat starting with the next one, so none always
runs right after another (the teacher's activations leave the caches cold for what follows).

    python benchmarks/step_overhead.py [--repeats 100] [--out benchmarks/results/step_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from kdistill import Distiller, Trainer, build_model
from kdistill.outputs import Batch
from kdistill.runtime import get_device, machine_description, seed_everything


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_overhead.json"))
    args = p.parse_args()

    # 1. models, optimizers and one batch
    seed_everything(0)
    device = get_device(args.device)
    teacher = build_model("classic_teacher")
    student_a, student_b = build_model("classic_student"), build_model("classic_student")
    plain = Trainer(student_a, device=device).compile("adam")
    distiller = Distiller(student_b, teacher, device=device)
    distiller.compile("adam", alpha=0.1, temperature=10)
    student_a.train(), student_b.train()
    x = torch.rand(args.batch_size, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch_size,))
    batch = Batch(x, y, torch.arange(args.batch_size)).to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    cases = {
        "student_step": lambda: plain.train_step(batch),
        "teacher_forward": lambda: distiller.teacher(batch),
        "distill_step": lambda: distiller.train_step(batch),
    }
    # 2. warm up, then time the three cases in rotation
    for _ in range(args.warmup):
        for fn in cases.values():
            fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in cases}
    names = list(cases)
    for i in range(args.repeats):
        for name in names[i % 3:] + names[:i % 3]:  # each case first, second and third alike
            fn = cases[name]
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "step_overhead",
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "median_seconds": med,
        "samples_per_second": {k: args.batch_size / v for k, v in med.items()},
        "overhead_ratio": med["distill_step"] / (med["student_step"] + med["teacher_forward"]),
        "teacher_forward_over_student_step": med["teacher_forward"] / med["student_step"],
        "device": str(device),
        "machine": machine_description(),
    }
    # 3. write JSON
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("samples_per_second", "overhead_ratio")}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
