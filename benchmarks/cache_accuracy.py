"""Does a cached teacher distil as well as the live one? Accuracy of the same student, 3 seeds.

Fashion-MNIST, the classic Keras-example models (``classic_teacher`` -> ``classic_student``)
and the classic config's distillation settings (``configs/fashion_mnist/kd/classic_cnn.yaml``:
Adam lr 1e-3, batch 64, alpha 0.1, temperature 10, 2 epochs, no augmentation). The teacher
is ``--teacher-checkpoint`` (trained 1 epoch and saved there if missing). Four teacher
caches are built over the training samples:

* ``cached_full_float32``: full logits, float32 (exactly the teacher's outputs);
* ``cached_full_float16``: full logits, float16;
* ``cached_topk_exact_T``: top-5 of 10 logits, float16, built with
  ``tail_temperatures=(T,)`` and opened at ``temperature=T`` (the tail mass exact at T);
* ``cached_topk_T1_tail``: top-5 of 10, float16, the ``T = 1`` tail only, opened at
  temperature 1 (the tail mass approximate at T = 10);

and for every seed the same student (``seed_everything(seed)`` before ``build_model``, so
the same initial weights for every variant; ``fit(seed=seed)``, so the same data order)
is distilled with the live teacher (``online``) and with each cache, then evaluated on the
10,000 test images. Reported: accuracy per variant and seed, mean and standard deviation
over seeds, each cached variant minus online (paired by seed), top-5 minus full float16,
whether online and cached float32 end with bit-identical weights (``torch.equal`` on the
state dicts), training wall times, cache build times and bytes per sample, and one pass of
the live teacher over the training samples in batches of 64 (timed, and compared with the
float32 and float16 caches' logits).

The JSON is written after every finished run; a rerun with the same settings skips the
runs already in it (the students' final weights are kept under ``--cache-dir`` for the
bit-identity check, the caches too, so they are not rebuilt). A rerun with other settings
is refused unless ``--fresh`` is given (which drops the old runs).

    python benchmarks/cache_accuracy.py [--seeds 0 1 2] [--epochs 2] [--subset N]
        [--out benchmarks/results/cache_accuracy.json]

About 25 minutes on 2 CPU cores (online distillation is ~3 minutes per epoch);
``--subset 2000 --epochs 1 --seeds 0`` takes about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from kdistill import Distiller, Trainer, build_model, load_checkpoint, load_dataset, save_checkpoint
from kdistill.atomic import atomic_write_text
from kdistill.runtime import machine_description, seed_everything
from kdistill.teacher import TeacherCache
from kdistill.teacher.cache import dataset_fingerprint, teacher_fingerprint

from _results import open_results

HERE = Path(__file__).parent
VARIANTS = ["online", "cached_full_float32", "cached_full_float16", "cached_topk_exact_T", "cached_topk_T1_tail"]
CACHED = VARIANTS[1:]
TOPK = ["cached_topk_exact_T", "cached_topk_T1_tail"]


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.inference_mode():
        pred = torch.cat([model(x[i : i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return (pred == y).float().mean().item()


def cache_specs(k: int, temperature: float) -> dict[str, dict]:
    """``{variant: (build kwargs, open temperature)}`` for the four caches."""
    return {
        "cached_full_float32": ({"mode": "full", "dtype": "float32"}, 1.0),
        "cached_full_float16": ({"mode": "full", "dtype": "float16"}, 1.0),
        "cached_topk_exact_T": ({"mode": "topk", "k": k, "dtype": "float16", "tail_temperatures": (temperature,)},
                                temperature),
        "cached_topk_T1_tail": ({"mode": "topk", "k": k, "dtype": "float16"}, 1.0),
    }


def summarise(results: dict, seeds: list[int]) -> dict:
    """Means, standard deviations and paired differences over the seeds run so far."""
    runs = results["runs"]
    acc = {v: {s: runs[f"{v}/seed{s}"]["test_accuracy"] for s in seeds if f"{v}/seed{s}" in runs} for v in VARIANTS}

    def stats(values: list[float]) -> dict:
        return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "n": len(values)} if values else {"mean": None, "std": None, "n": 0}

    def paired(a: str, b: str) -> dict:
        common = [s for s in seeds if s in acc[a] and s in acc[b]]
        diffs = {str(s): acc[a][s] - acc[b][s] for s in common}
        return {"per_seed": diffs, **stats(list(diffs.values()))}

    summary = {
        "accuracy": {v: {"per_seed": {str(s): a for s, a in acc[v].items()}, **stats(list(acc[v].values()))}
                     for v in VARIANTS},
        "minus_online": {v: paired(v, "online") for v in CACHED},
        "topk_minus_full_float16": {v: paired(v, "cached_full_float16") for v in TOPK},
        "train_seconds": {v: stats([runs[f"{v}/seed{s}"]["train_seconds"] for s in acc[v]]) for v in VARIANTS},
    }
    identical = {}
    for s in seeds:
        a, b = runs.get(f"online/seed{s}"), runs.get(f"cached_full_float32/seed{s}")
        if a and b:
            wa = torch.load(a["weights"], map_location="cpu", weights_only=True)
            wb = torch.load(b["weights"], map_location="cpu", weights_only=True)
            same = wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)
            max_diff = max((wa[n] - wb[n]).abs().max().item() for n in wa if wa[n].is_floating_point())
            identical[str(s)] = {"bit_identical": same, "max_abs_weight_diff": max_diff}
    summary["online_vs_cached_float32_weights"] = identical
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--subset", type=int, default=None, help="distil on the first N training samples (default: all 60,000)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--temperature", type=float, default=10.0)
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--teacher-checkpoint", default=str(HERE / ".cache" / "classic_teacher.pt"),
                   help="trained classic_teacher (trained 1 epoch and saved here if missing)")
    p.add_argument("--cache-dir", default=str(HERE / ".cache" / "cache_accuracy"),
                   help="where the teacher caches and the students' final weights are kept")
    p.add_argument("--fresh", action="store_true", help="drop runs in --out made with other settings")
    p.add_argument("--out", default=str(HERE / "results" / "cache_accuracy.json"))
    args = p.parse_args()
    t_start = time.perf_counter()

    # 1. data and the teacher
    data = load_dataset("fashion_mnist")
    x_train, y_train = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    teacher = build_model("classic_teacher")
    ckpt = Path(args.teacher_checkpoint)
    if ckpt.is_file():
        load_checkpoint(ckpt, teacher)
        teacher_source = f"loaded {ckpt}"
    else:
        seed_everything(0)
        teacher = build_model("classic_teacher")
        Trainer(teacher, device="cpu").compile("adam", metrics=["accuracy"]).fit(
            x_train, y_train, epochs=1, batch_size=64, seed=0, verbose=2)
        save_checkpoint(ckpt, teacher)
        teacher_source = f"trained 1 epoch (adam lr 1e-3, batch 64, seed 0), saved to {ckpt}"
    teacher.eval()
    teacher_acc = accuracy(teacher, x_test, y_test)
    print(f"teacher ({teacher_source}): test accuracy {100 * teacher_acc:.2f}%", flush=True)
    if args.subset is not None:
        x_train, y_train = x_train[: args.subset], y_train[: args.subset]
    n = len(x_train)

    settings = {
        "dataset": "fashion_mnist", "train_samples": n, "subset": args.subset, "test_samples": len(x_test),
        "teacher": "classic_teacher", "teacher_fingerprint": teacher_fingerprint(teacher),
        "train_fingerprint": dataset_fingerprint(x_train), "student": "classic_student",
        "epochs": args.epochs, "batch_size": args.batch_size, "optimizer": "Adam lr 1e-3",
        "alpha": args.alpha, "temperature": args.temperature, "k": args.k, "augmentation": None,
    }
    out = Path(args.out)
    results = open_results(out, settings, fresh=args.fresh)
    results.update({"benchmark": "cache_accuracy", "settings": settings, "teacher_source": teacher_source,
                    "teacher_test_accuracy": teacher_acc})
    runs = results.setdefault("runs", {})
    caches_info = results.setdefault("caches", {})
    cache_dir = Path(args.cache_dir) / f"n{n}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    weights_dir = cache_dir / f"students-e{args.epochs}-T{args.temperature:g}-a{args.alpha:g}-k{args.k}"
    weights_dir.mkdir(exist_ok=True)

    def save() -> None:
        results["summary"] = summarise(results, args.seeds)
        results["machine"] = machine_description()
        atomic_write_text(out, json.dumps(results, indent=1))

    # 2. the caches (kept under --cache-dir: a rerun opens them; build times from the run that built them)
    specs = cache_specs(args.k, args.temperature)
    for name, (kwargs, _) in specs.items():
        path = cache_dir / name
        fresh_build = not (path / "manifest.json").is_file()
        resumed = fresh_build and any(cache_dir.glob(f"{name}.tmp-*"))  # an interrupted build goes on
        start = time.perf_counter()
        cache = TeacherCache.build(teacher, x_train, path, device="cpu", dataset_name="fashion_mnist", **kwargs)
        seconds = time.perf_counter() - start
        if fresh_build or name not in caches_info:
            caches_info[name] = {
                "build": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
                "bytes_per_sample": cache.bytes_per_sample, "total_bytes": cache.bytes_per_sample * n,
                "build_seconds": seconds if fresh_build else None, "build_resumed": resumed,
                "load_average_after_build": os.getloadavg(),
            }
            print(f"cache {name}: {cache.bytes_per_sample} B/sample, "
                  + (f"built in {seconds:.1f} s" if fresh_build else "already built"), flush=True)

    # 3. one live-teacher pass in distillation's batch size: its time, and how the caches' logits compare
    if "teacher_pass" not in results:
        start = time.perf_counter()
        with torch.inference_mode():
            live = torch.cat([teacher(x_train[i : i + args.batch_size]) for i in range(0, n, args.batch_size)])
        seconds = time.perf_counter() - start
        results["teacher_pass"] = {"batch_size": args.batch_size, "seconds": seconds}
        for name in ("cached_full_float32", "cached_full_float16"):
            stored = torch.from_numpy(np.load(cache_dir / name / "logits.npy").astype("float32"))
            results["teacher_pass"][f"{name}_max_abs_logit_diff"] = (stored - live).abs().max().item()
            results["teacher_pass"][f"{name}_bit_identical_logits"] = bool(torch.equal(stored, live))
        for name, info in caches_info.items():
            if info["build_seconds"] is not None and not info.get("build_resumed"):
                info["build_over_teacher_pass"] = info["build_seconds"] / seconds
        print(f"live teacher pass (batch {args.batch_size}): {seconds:.1f} s; "
              f"{json.dumps({k: v for k, v in results['teacher_pass'].items() if 'logit' in k})}", flush=True)
    save()

    # 4. every seed x variant (runs already in the JSON are kept)
    for seed in args.seeds:
        for variant in args.variants:
            key = f"{variant}/seed{seed}"
            if key in runs:
                continue
            seed_everything(seed)
            student = build_model("classic_student")
            if variant == "online":
                source = teacher
            else:
                source = TeacherCache.open(cache_dir / variant, teacher=teacher, x=x_train,
                                           temperature=specs[variant][1])
            d = Distiller(student=student, teacher=source, device="cpu")
            d.compile(torch.optim.Adam(student.parameters(), lr=1e-3), metrics=["accuracy"],
                      alpha=args.alpha, temperature=args.temperature)
            load_before = os.getloadavg()
            start = time.perf_counter()
            d.fit(x_train, y_train, epochs=args.epochs, batch_size=args.batch_size, seed=seed, verbose=0)
            seconds = time.perf_counter() - start
            ev = d.evaluate(x_test, y_test)
            weights = weights_dir / f"{variant}-seed{seed}.pt"
            torch.save(student.state_dict(), weights)
            runs[key] = {"variant": variant, "seed": seed, "test_accuracy": ev["accuracy"], "evaluate": ev,
                         "train_seconds": seconds, "load_average_before": load_before,
                         "load_average_after": os.getloadavg(), "weights": str(weights),
                         "weights_fingerprint": teacher_fingerprint(student)}
            print(f"{key}: {100 * ev['accuracy']:.2f}% ({seconds:.0f} s)", flush=True)
            save()

    results["last_invocation_seconds"] = time.perf_counter() - t_start
    save()
    s = results["summary"]
    print("| variant | accuracy (mean ± std) | per seed | minus online | train s |")
    print("|---|---|---|---|---|")
    for v in VARIANTS:
        a = s["accuracy"][v]
        if not a["n"]:
            continue
        diff = s["minus_online"].get(v, {}).get("mean")
        print(f"| {v} | {100 * a['mean']:.2f} ± {100 * a['std']:.2f} | "
              + ", ".join(f"{100 * x:.2f}" for x in a["per_seed"].values())
              + f" | {'' if diff is None else f'{100 * diff:+.2f}'} | {s['train_seconds'][v]['mean']:.0f} |")
    print("topk minus full float16:", json.dumps(s["topk_minus_full_float16"]))
    print("online vs cached float32 weights:", json.dumps(s["online_vs_cached_float32_weights"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
