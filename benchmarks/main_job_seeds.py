"""Does the main job's result hold across seeds? ``kdistill classic`` with seeds 0, 1, 2.

Runs the main job (:func:`kdistill.regimes.run_regimes` on the shipped
``configs/fashion_mnist/kd/classic_cnn.yaml``, as ``kdistill classic`` does: few labels +
transfer set, and all labels) once per seed. The seed picks the labelled subset, the
students' initial weights and the data order. The teacher is the same for every seed (it
stands for the model a user already has): the first seed's run trains it (or
``--teacher-checkpoint`` gives it), and the other seeds load its weights as they are.

Reported per seed and regime: teacher, scratch and distilled accuracy, the gain in points,
the share of the teacher-scratch gap recovered; then per regime the mean, the minimum and
maximum of the gain, and whether every seed's gain has the same sign. The JSON also
records the settings, the machine, the date and each run's wall time.

    python benchmarks/main_job_seeds.py [--seeds 0 1 2] [--out-dir runs/main_job_seeds]
        [--out benchmarks/results/main_job_seeds.json] [--set key=value ...]

About 5 minutes per seed on 2 CPU cores after the first (which trains the teacher).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from kdistill.atomic import atomic_write_text
from kdistill.cli.classic import shipped_config
from kdistill.config import load_config
from kdistill.regimes import run_regimes
from kdistill.runtime import machine_description

HERE = Path(__file__).parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--labels", type=int, default=1000)
    p.add_argument("--teacher-checkpoint", default=None, help="default: the first seed's run trains the teacher")
    p.add_argument("--out-dir", default="runs/main_job_seeds", help="run directories, one per seed")
    p.add_argument("--out", default=str(HERE / "results" / "main_job_seeds.json"))
    p.add_argument("--set", dest="overrides", nargs="*", default=[], help="config overrides for every seed")
    args = p.parse_args(argv)

    started = time.time()
    teacher = args.teacher_checkpoint
    runs = {}
    for seed in args.seeds:
        overrides = [f"seed={seed}", *args.overrides]
        if teacher is not None:
            overrides += [f"teacher.checkpoint={teacher}", "stages.teacher.epochs=0"]
        config = load_config(shipped_config(), overrides)
        out_dir = Path(args.out_dir) / f"seed{seed}"
        t0 = time.time()
        summary = run_regimes(config, out_dir, labels=args.labels, verbose=0)
        runs[seed] = {"wall_seconds": time.time() - t0, "regimes": summary["regimes"], "run_dir": str(out_dir)}
        if teacher is None:  # the first seed's teacher is every other seed's
            teacher = str(out_dir / "few_labels" / "stages" / "teacher" / "checkpoint.pt")
        print(f"seed {seed}: " + "; ".join(
            f"{name} {r['accuracy']['scratch']:.4f} -> {r['accuracy']['distil']:.4f} ({r['gain_points']:+.2f})"
            for name, r in summary["regimes"].items()), flush=True)

    per_regime = {}
    for name in runs[args.seeds[0]]["regimes"]:
        gains = [runs[s]["regimes"][name]["gain_points"] for s in args.seeds]
        recovered = [runs[s]["regimes"][name]["accuracy_recovered"] for s in args.seeds]
        per_regime[name] = {
            "gain_points": gains, "gain_mean": statistics.mean(gains), "gain_min": min(gains), "gain_max": max(gains),
            "same_sign": all(g > 0 for g in gains) or all(g < 0 for g in gains),
            "accuracy_recovered": recovered,
            "recovered_mean": None if None in recovered else statistics.mean(recovered),
            "distilled": [runs[s]["regimes"][name]["accuracy"]["distil"] for s in args.seeds],
            "scratch": [runs[s]["regimes"][name]["accuracy"]["scratch"] for s in args.seeds],
            "teacher": runs[args.seeds[0]]["regimes"][name]["accuracy"]["teacher"],
        }
    result = {
        "benchmark": "main_job_seeds",
        "command": " ".join([sys.executable, *sys.argv]),
        "config": str(shipped_config()), "labels": args.labels, "overrides": args.overrides, "seeds": args.seeds,
        "teacher": "trained by the first seed's run, loaded as it is by the others" if args.teacher_checkpoint is None
        else args.teacher_checkpoint,
        "per_seed": {str(k): v for k, v in runs.items()},
        "per_regime": per_regime,
        "wall_seconds": time.time() - started,
        "machine": machine_description(),
        "date": time.strftime("%Y-%m-%d"),
    }
    atomic_write_text(args.out, json.dumps(result, indent=1))
    for name, r in per_regime.items():
        print(f"{name}: gain {r['gain_mean']:+.2f} points (min {r['gain_min']:+.2f}, max {r['gain_max']:+.2f}), "
              f"same sign on every seed: {r['same_sign']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
