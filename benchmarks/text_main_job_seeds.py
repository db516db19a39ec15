"""Does the text main job's result hold across seeds? Seeds 0, 1, 2 of
``configs/text/kd/python_llama.yaml``.

The seed sets the students' initial weights and the data order (the held-out files and the
tokenizer depend on the corpus only). The teacher is the same for every seed (it stands for
the model a user already has): the first seed's run trains it, the other seeds load its
weights as they are (``teacher.checkpoint`` with ``stages.teacher.epochs: 0``).

Reported per seed: the held-out perplexity of teacher, scratch and distilled student, the
perplexity gain (scratch - distilled), the share of the teacher-scratch gap in held-out
loss recovered, the distilled student's top-1 agreement with the teacher against the
scratch student's; then the mean, minimum and maximum gain, and whether every seed's gain
has the same sign.

    python benchmarks/text_main_job_seeds.py [--seeds 0 1 2] [--out-dir runs/text_main_job_seeds]
        [--out benchmarks/results/text_main_job_seeds.json] [--set key=value ...]

About 10 minutes for the first seed on 2 CPU cores (it trains the teacher), 5 for each other.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from kdistill.atomic import atomic_write_text
from kdistill.config import load_config
from kdistill.experiment import run_experiment
from kdistill.runtime import machine_description

HERE = Path(__file__).parent
CONFIG = HERE.parent / "configs" / "text" / "kd" / "python_llama.yaml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--config", default=str(CONFIG))
    p.add_argument("--out-dir", default="runs/text_main_job_seeds", help="run directories, one per seed")
    p.add_argument("--out", default=str(HERE / "results" / "text_main_job_seeds.json"))
    p.add_argument("--set", dest="overrides", nargs="*", default=[], help="config overrides for every seed")
    args = p.parse_args(argv)

    started = time.time()
    teacher = None
    runs = {}
    for seed in args.seeds:
        out_dir = Path(args.out_dir) / f"seed{seed}"
        overrides = [f"seed={seed}", f"output_dir={out_dir}", "teacher_store=null", *args.overrides]
        if teacher is not None:
            overrides += [f"teacher.checkpoint={teacher}", "stages.teacher.epochs=0"]
        config = load_config(args.config, overrides)
        t0 = time.time()
        m = run_experiment(config, verbose=0, log=lambda message: None)
        models = m["models"]
        runs[seed] = {
            "wall_seconds": time.time() - t0, "run_dir": str(out_dir),
            "perplexity": {k: v["perplexity"] for k, v in models.items()},
            "held_out_loss": {k: v["held_out_loss"] for k, v in models.items()},
            "agreement_with_teacher": {k: v.get("agreement_with_teacher") for k, v in models.items() if k != "teacher"},
            "perplexity_gain": m["perplexity_gain"], "loss_gap_recovered": m["loss_gap_recovered"],
            "stage_seconds": m["timing"]["stages"],
        }
        if teacher is None:  # the first seed's teacher is every other seed's
            teacher = str(out_dir / "stages" / "teacher" / "checkpoint.pt")
        ppl = runs[seed]["perplexity"]
        print(f"seed {seed}: teacher {ppl['teacher']:.2f}, scratch {ppl['scratch']:.2f} -> distilled "
              f"{ppl['distil']:.2f} ({m['perplexity_gain']:+.2f}, {100 * (m['loss_gap_recovered'] or 0):.0f}% of "
              f"the gap), {runs[seed]['wall_seconds']:.0f} s", flush=True)

    gains = [runs[s]["perplexity_gain"] for s in args.seeds]
    recovered = [runs[s]["loss_gap_recovered"] for s in args.seeds]
    result = {
        "benchmark": "text_main_job_seeds",
        "command": " ".join([sys.executable, *sys.argv]),
        "config": str(Path(args.config)), "overrides": args.overrides, "seeds": args.seeds,
        "teacher": "trained by the first seed's run, loaded as it is by the others",
        "per_seed": {str(k): v for k, v in runs.items()},
        "summary": {
            "perplexity_gain": gains, "gain_mean": statistics.mean(gains), "gain_min": min(gains),
            "gain_max": max(gains), "same_sign": all(g > 0 for g in gains) or all(g < 0 for g in gains),
            "loss_gap_recovered": recovered,
            "recovered_mean": None if None in recovered else statistics.mean(recovered),
        },
        "wall_seconds": time.time() - started,
        "machine": machine_description(),
        "date": time.strftime("%Y-%m-%d"),
    }
    atomic_write_text(args.out, json.dumps(result, indent=1))
    s = result["summary"]
    print(f"perplexity gain {s['gain_mean']:+.2f} (min {s['gain_min']:+.2f}, max {s['gain_max']:+.2f}), "
          f"same sign on every seed: {s['same_sign']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
