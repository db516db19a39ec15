"""Does bf16 training cost accuracy? The classic run's distil stage in fp32 and in bf16.

Runs the shipped ``configs/fashion_mnist/kd/classic_cnn.yaml`` (every label, as ``kdistill
run`` runs it) once per precision, with ``stages.distil.precision`` set to each: the
distilled student's forward runs under ``torch.autocast`` in bfloat16 for ``bf16``; the
losses, weights and optimizer stay float32. The teacher (float32) and the cache of its
logits are made by the first run and shared through a private stage store, so the runs
differ in the distil stage's precision only (same seed, same data order, same initial
student). The scratch stage is off (``stages.scratch.enabled=false``): it does not depend
on the distil stage's precision.

Reported: the distilled student's test accuracy per precision, each one's difference from
fp32 in points, whether it is within ``--tolerance`` points (2) of fp32, and the distil
stage's wall time. The JSON is written after every run; a rerun with the same settings
skips the runs it holds (``--fresh`` starts over).

    # the CPU run (benchmarks/results/precision_accuracy_cpu.json; ~10 min at 1 thread)
    python benchmarks/precision_accuracy.py --threads 1
    python benchmarks/precision_accuracy.py --device cuda --precisions fp32 bf16 fp16 \\
        --out benchmarks/results/precision_accuracy_cuda.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kdistill.atomic import atomic_write_text
from kdistill.cli.classic import shipped_config
from kdistill.config import load_config
from kdistill.experiment import run_experiment
from kdistill.runtime import machine_description

from _results import open_results, stamp

HERE = Path(__file__).parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--precisions", nargs="+", choices=["fp32", "bf16", "fp16"], default=["fp32", "bf16"],
                   help="distil-stage precisions (fp32 first: the others are compared with it)")
    p.add_argument("--tolerance", type=float, default=2.0, help="accepted accuracy loss in points (default 2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: the config's)")
    p.add_argument("--out-dir", default="runs/precision_accuracy", help="run directories and their stage store")
    p.add_argument("--out", default=str(HERE / "results" / "precision_accuracy_cpu.json"))
    p.add_argument("--set", dest="overrides", nargs="*", default=[], help="config overrides for every run")
    p.add_argument("--fresh", action="store_true", help="replace an --out made with other settings")
    args = p.parse_args(argv)
    if args.precisions[0] != "fp32":
        p.error("--precisions must start with fp32 (the reference)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = {"config": str(shipped_config()), "device": args.device, "threads": args.threads,
                "overrides": args.overrides, "scratch": False}
    results = open_results(args.out, settings, fresh=args.fresh)
    results["settings"] = settings
    runs = results.setdefault("runs", {})
    spent = results.get("wall_seconds", 0.0)
    out_dir = Path(args.out_dir)
    for precision in args.precisions:
        if precision in runs:
            print(f"{precision}: in {args.out} already ({runs[precision]['test_accuracy']:.4f})")
            continue
        overrides = [f"device={args.device}", f"teacher_store={out_dir / 'store'}", "stages.scratch.enabled=false",
                     f"stages.distil.precision={precision}", f"output_dir={out_dir / precision}",
                     *([f"threads={args.threads}"] if args.threads else []), *args.overrides]
        config = load_config(shipped_config(), overrides)
        started = time.time()
        metrics = run_experiment(config, verbose=0, log=lambda m: print(f"  [{precision}] {m}", flush=True))
        spent += time.time() - started
        distil = metrics["models"]["distil"]
        runs[precision] = {
            "test_accuracy": distil["test_accuracy"],
            "teacher_accuracy": metrics["models"]["teacher"]["test_accuracy"],
            "distil_seconds": metrics["timing"]["stages"].get("distil"),
            "history": metrics["histories"]["distil"]["history"],
            "run_dir": str(out_dir / precision),
        }
        print(f"{precision}: distilled student {distil['test_accuracy']:.4f}", flush=True)
        summarise(results, args.tolerance)
        stamp(results, wall_seconds=spent, machine=machine_description())
        atomic_write_text(args.out, json.dumps(results, indent=1))
    summarise(results, args.tolerance)
    atomic_write_text(args.out, json.dumps(results, indent=1))
    for precision, diff in results["summary"]["difference_points"].items():
        print(f"{precision}: {diff:+.2f} points against fp32 "
              f"({'within' if results['summary']['within_tolerance'][precision] else 'beyond'} "
              f"{args.tolerance:g} points)")
    print(f"wrote {args.out}")
    return 0


def summarise(results: dict, tolerance: float) -> None:
    """Each precision's accuracy difference from fp32, in points, and whether it is within
    ``tolerance``."""
    runs = results["runs"]
    if "fp32" not in runs:
        return
    ref = runs["fp32"]["test_accuracy"]
    diff = {p: 100 * (r["test_accuracy"] - ref) for p, r in runs.items() if p != "fp32"}
    results["summary"] = {"tolerance_points": tolerance, "fp32_accuracy": ref, "difference_points": diff,
                          "within_tolerance": {p: d >= -tolerance for p, d in diff.items()}}


if __name__ == "__main__":
    raise SystemExit(main())
