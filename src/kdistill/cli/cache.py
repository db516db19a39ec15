"""``kdistill cache``: build, inspect and verify offline teacher caches.

``kdistill cache build SOURCE --out PATH`` runs a teacher once over the distil stage's
training data and stores its outputs (:class:`~kdistill.teacher.TeacherCache`). ``SOURCE``
is a run directory whose teacher has finished, or a config file whose
``teacher.checkpoint`` is set; the data, the layers the losses tap and the augmentation
come from that config, the cache settings from ``stages.distil.teacher_cache`` and the
flags (flags win). The size is printed before anything is built (``--dry-run`` stops
there). Point ``stages.distil.teacher_cache.path`` at the result to distil from it.

``kdistill cache info PATH`` prints a cache's manifest summary; ``kdistill cache verify
PATH`` checks every file against its checksum (exit status 1 when one differs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..errors import KDistillError
from .config import add_set_option


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cache", help="build, inspect or verify an offline teacher cache", description=__doc__)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    b = actions.add_parser("build", help="run the teacher once and store its outputs",
                           description=__doc__.split("\n\n")[1])
    b.add_argument("source", nargs="?", metavar="RUN_DIR_OR_CONFIG",
                   help="a run directory with a finished teacher, or a config with teacher.checkpoint (required)")
    b.add_argument("--out", required=True, help="the cache directory to write")
    add_set_option(b, config="source", help="config overrides by dotted path, e.g. --set data.subset=1000 (a config "
                                            "file source only); repeatable")
    b.add_argument("--mode", choices=["full", "topk"], default=None, help="full logits or top-k (default: the config's, else full)")
    b.add_argument("--k", type=int, default=None, help="classes kept per sample with --mode topk (default: the config's teacher_cache.k)")
    b.add_argument("--dtype", choices=["float16", "float32"], default=None,
                   help="storage type of the logits (default: the config's, else float16)")
    b.add_argument("--views", type=int, default=None,
                   help="augmented views per sample, made with the config's data.augment; 0: none "
                        "(default: the config's teacher_cache.views, else 0)")
    b.add_argument("--features", nargs="*", default=None, metavar="LAYER",
                   help="teacher layers to store (default: the ones the config's losses tap)")
    b.add_argument("--temperature", type=float, nargs="*", default=None, metavar="T",
                   help="top-k: temperatures at which to store the tail exactly (default: the distil stage's)")
    b.add_argument("--batch-size", type=int, default=None,
                   help="samples per teacher forward (default: the config's teacher_cache.batch_size, else 256)")
    b.add_argument("--device", default=None, help="where the teacher runs, e.g. cpu or cuda (default: the config's device)")
    b.add_argument("--overwrite", action="store_true", help="replace a cache of another teacher, data or settings")
    b.add_argument("--dry-run", action="store_true", help="print what would be stored and its size, build nothing")
    b.set_defaults(run=run_build)

    i = actions.add_parser("info", help="print a cache's manifest summary",
                           description="Print a teacher cache's manifest summary: mode, dtype, samples, views, layers, "
                                       "size, and the teacher it was built from.")
    i.add_argument("path", help="a teacher cache directory")
    i.add_argument("--json", action="store_true", help="print the whole summary as JSON")
    i.set_defaults(run=run_info)

    v = actions.add_parser("verify", help="check every file of a cache against its checksum",
                           description="Check every file of a teacher cache against the SHA-256 in its manifest "
                                       "(exit status 1 naming the first file that differs).")
    v.add_argument("path", help="a teacher cache directory")
    v.set_defaults(run=run_verify)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def _source(args: argparse.Namespace):
    """``(config, data, teacher)`` of a run directory or a config with a teacher checkpoint."""
    from ..checkpoint import load_weights
    from ..config import load_config
    from ..experiment import build_model, load_data, load_stage_model
    from ..run.directory import read_run_config

    if args.source is None:
        raise KDistillError("give the teacher to cache: kdistill cache build RUN_DIR_OR_CONFIG --out PATH")
    src = Path(args.source)
    if src.is_dir():
        if args.overrides:
            raise KDistillError("--set applies to a config file source; a run directory keeps its own config")
        config = read_run_config(src)
        data = load_data(config)
        return config, data, load_stage_model(src, "teacher", data=data)
    config = load_config(src, args.overrides)
    if config.teacher.checkpoint is None:
        raise KDistillError(
            f"{src} sets no teacher.checkpoint, so there is no trained teacher to cache; give a run directory "
            "whose teacher has finished (kdistill run CONFIG first), or set teacher.checkpoint")
    data = load_data(config)
    teacher = build_model(config.teacher, data)
    load_weights(config.teacher.checkpoint, teacher)
    return config, data, teacher.eval()


def run_build(args: argparse.Namespace) -> int:
    from ..config import TeacherCacheConfig
    from ..distiller import loss_temperatures, tapped_layers
    from ..experiment import build_augment, build_losses, distil_inputs
    from ..teacher import TeacherCache, estimate_size

    config, data, teacher = _source(args)
    ds = config.stages.distil
    tc = ds.teacher_cache or TeacherCacheConfig()
    mode = args.mode or tc.mode
    k = args.k if args.k is not None else (tc.k if mode == tc.mode else None)
    views = args.views if args.views is not None else tc.views
    augment = build_augment(config)
    if views and augment is None:
        raise KDistillError("--views needs an augmentation to make the views: the config's data.augment is empty")
    loss = build_losses(ds)  # what the stage's losses read, and at which temperature
    features = tapped_layers(loss)["teacher"] if args.features is None else args.features
    temps = loss_temperatures(loss) if args.temperature is None else tuple(args.temperature)
    settings = dict(mode=mode, k=k, dtype=args.dtype or tc.dtype, features=features,
                    tail_temperatures=temps if mode == "topk" else (), views=views)
    x = distil_inputs(config, data)
    try:
        size = estimate_size(teacher, x, **settings)
    except ValueError as e:
        raise KDistillError(str(e)) from None
    print(f"teacher {config.teacher.label()} over {data.name}: {len(x):,} samples"
          + (f" x {views} views" if views else "") + f", mode {mode}" + (f" (k={k})" if k else "")
          + f", {settings['dtype']}" + (f", layers {', '.join(features)}" if features else ""))
    for fname, per_sample in size["files"].items():
        print(f"  {fname:<28} {per_sample:>10,} B/sample  {_mib(per_sample * len(x)):>12}")
    print(f"  {'total':<28} {size['bytes_per_sample']:>10,} B/sample  {_mib(size['total_bytes']):>12}")
    if args.dry_run:
        return 0
    started = time.perf_counter()
    try:
        cached = TeacherCache.build(teacher, x, args.out, augment=augment if views else None, seed=config.seed,
                                    batch_size=args.batch_size or tc.batch_size, device=args.device or config.device,
                                    dataset_name=data.name, overwrite=args.overwrite, **settings)
    except (ValueError, TypeError) as e:
        raise KDistillError(str(e)) from None
    print(f"wrote {cached.path} in {time.perf_counter() - started:.1f} s; distil from it with "
          f"--set stages.distil.teacher_cache.path={cached.path}"
          + (f" stages.distil.teacher_cache.mode=topk stages.distil.teacher_cache.k={k}" if mode == "topk" else "")
          + (f" stages.distil.teacher_cache.views={views}" if views else ""))
    return 0


def run_info(args: argparse.Namespace) -> int:
    from ..teacher import TeacherCache

    info = TeacherCache.open(args.path, verify=False).describe()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    rows = [
        ("path", info["path"]),
        ("mode", info["mode"] + (f", k={info['k']}" if info["k"] else "")
         + (f", exact tail at T={info['tail_temperatures']}" if info["tail_temperatures"] else "")),
        ("dtype", info["dtype"]),
        ("samples", f"{info['num_samples']:,} ({info['dataset'].get('name') or 'unnamed'}, shape {info['dataset']['shape']})"),
        ("classes", info["num_classes"]),
        ("views", info["views"] or "none (un-augmented samples)"),
        ("augment", json.dumps(info["augment"]) if info["augment"] else "-"),
        ("layers", ", ".join(f"{k} {v}" for k, v in info["features"].items()) or "-"),
        ("size", f"{info['bytes_per_sample']:,} B/sample, {_mib(info['total_bytes'])}"),
        ("teacher", f"{info['teacher']['class']} {info['teacher']['fingerprint'][:23]}..."),
        ("built by", f"kdistill {info['kdistill_version']} (format {info['format_version']})"),
    ]
    for name, value in rows:
        print(f"{name:<9} {value}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from ..teacher import TeacherCache

    started = time.perf_counter()
    cached = TeacherCache.open(args.path, verify=True)  # raises CacheError (exit 1) naming the bad file
    print(f"{cached.path}: every file matches its checksum ({_mib(cached.describe()['total_bytes'])}, "
          f"{time.perf_counter() - started:.1f} s)")
    return 0
