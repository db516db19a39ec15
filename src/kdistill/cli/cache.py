"""``kdistill cache``: build, inspect and verify offline teacher caches.

``kdistill cache build SOURCE --out PATH`` runs a teacher once over the distil stage's
training data and stores its outputs (:class:`~kdistill.teacher.TeacherCache`). ``SOURCE``
is a run directory whose teacher has finished, or a config file whose
``teacher.checkpoint`` is set; the data, the layers the losses tap and the augmentation
come from that config, the cache settings from ``stages.distil.teacher_cache`` and the
flags (flags win). The size is printed before anything is built (``--dry-run`` stops
there). Point ``stages.distil.teacher_cache.path`` at the result to distil from it.

For a language-model config or run (``data.text``) it builds a top-k token cache
(:class:`~kdistill.teacher.TokenCache`) of the teacher over the distil stage's training
sequences (``--k`` tokens per position, ``--dtype``, ``--value-bits`` or ``--curve`` with
``--exact-k``); a config source then needs ``teacher.checkpoint`` (or a pretrained
``teacher.path``) and ``data.text.tokenizer``, the tokenizer the teacher was trained with.

``kdistill cache info PATH`` prints a cache's manifest summary; ``kdistill cache verify
PATH`` checks every file against its checksum (exit status 1 when one differs). Both
recognise image and token caches by their manifest.
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
    b.add_argument("--k", type=int, default=None,
                   help="classes kept per sample with --mode topk, or tokens per position for a language model "
                        "(default: the config's teacher_cache.k, else 64 for a language model)")
    b.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default=None,
                   help="storage type of the logits (default: the config's, else float16; bfloat16: language models)")
    b.add_argument("--value-bits", type=int, default=None, metavar="BITS",
                   help="language models: store each log-probability as a BITS-bit code (1-16) on its position's "
                        "grid (default: the config's teacher_cache.value_bits, else --dtype values)")
    b.add_argument("--curve", type=int, default=None, metavar="TERMS",
                   help="language models: store the log-probabilities past the top --exact-k as TERMS coefficients "
                        "(1-7) of a curve in their rank, e.g. 6; not with --value-bits (default: the config's "
                        "teacher_cache.curve)")
    b.add_argument("--exact-k", type=int, default=None, metavar="N",
                   help="language models, with --value-bits or --curve: the top N log-probabilities kept in --dtype, "
                        "e.g. 8 (default: the config's teacher_cache.exact_k, else min(4, k))")
    b.add_argument("--views", type=int, default=None,
                   help="augmented views per sample, made with the config's data.augment; 0: none "
                        "(default: the config's teacher_cache.views, else 0)")
    b.add_argument("--features", nargs="*", default=None, metavar="LAYER",
                   help="teacher layers to store (default: the ones the config's losses tap)")
    b.add_argument("--temperature", type=float, nargs="*", default=None, metavar="T",
                   help="top-k: temperatures at which to store the tail exactly (default: the distil stage's)")
    b.add_argument("--batch-size", type=int, default=None,
                   help="samples per teacher forward (default: the config's teacher_cache.batch_size, else 256; "
                        "language models: sequences, else 16)")
    b.add_argument("--device", default=None, help="where the teacher runs, e.g. cpu or cuda (default: the config's device)")
    b.add_argument("--overwrite", action="store_true", help="replace a cache of another teacher, data or settings")
    b.add_argument("--dry-run", action="store_true", help="print what would be stored and its size, build nothing")
    b.set_defaults(run=run_build)

    i = actions.add_parser("info", help="print a cache's manifest summary",
                           description="Print a teacher cache's manifest summary: mode, dtype, samples, views, layers, "
                                       "size, and the teacher it was built from (a token cache: k, vocabulary, "
                                       "positions, bytes per position, value dtype, teacher).")
    i.add_argument("path", help="a teacher cache or token cache directory")
    i.add_argument("--json", action="store_true", help="print the whole summary as JSON")
    i.set_defaults(run=run_info)

    v = actions.add_parser("verify", help="check every file of a cache against its checksum",
                           description="Check every file of a teacher cache against the SHA-256 in its manifest "
                                       "(exit status 1 naming the first file that differs).")
    v.add_argument("path", help="a teacher cache or token cache directory")
    v.set_defaults(run=run_verify)


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def _text_config(args: argparse.Namespace):
    """``(config, source)`` when the source is a language-model config or run (``data.text``), else None."""
    from ..config import load_config
    from ..run.directory import read_run_config

    if args.source is None:
        return None
    src = Path(args.source)
    if src.is_dir():
        config = read_run_config(src)
    elif src.is_file():
        config = load_config(src, args.overrides)
    else:
        return None  # _source names what is missing
    if config.data.text is None:
        return None
    if src.is_dir() and args.overrides:
        raise KDistillError("--set applies to a config file source; a run directory keeps its own config")
    return config, src


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


def _text_source(args: argparse.Namespace, src: Path, config):
    """``(config, students' token blocks, teacher)`` of a language-model run directory or
    config (teacher weights from ``teacher.checkpoint`` or a pretrained ``path``)."""
    from ..checkpoint import load_weights
    from ..experiment import load_stage_model
    from ..text_experiment import build_lm, load_text_data, student_blocks

    if src.is_dir():
        data = load_text_data(config, src)  # the run's own tokenizer (RUN_DIR/tokenizer)
        teacher = load_stage_model(src, "teacher")
    else:
        if config.teacher.checkpoint is None and "path" not in config.teacher.kwargs:
            raise KDistillError(
                f"{src} sets neither teacher.checkpoint nor a pretrained teacher path, so there is no trained "
                "teacher to cache; give a run directory whose teacher has finished (kdistill run CONFIG first), "
                "or set teacher.checkpoint")
        if config.data.text.tokenizer is None:
            raise KDistillError(
                f"{src} sets no data.text.tokenizer: a new tokenizer would not be the one the teacher was trained "
                "with. Set data.text.tokenizer to its directory, or give the run directory the teacher was "
                "trained in")
        import tempfile

        with tempfile.TemporaryDirectory() as scratch:
            data = load_text_data(config, Path(scratch))
        teacher = build_lm(config.teacher, data.vocab_size)
        if config.teacher.checkpoint is not None:
            load_weights(Path(config.teacher.checkpoint), teacher)
    return data, student_blocks(data.train, config.data.subset, config.seed), teacher.eval()


def _token_row_bytes(k: int, vocab: int, dtype: str, value_bits: int | None, curve: int | None = None,
                     exact_k: int | None = None) -> int | None:
    """Bytes a token cache stores per position with these settings (None: not known here),
    with ``exact_k`` resolved as :meth:`TokenCache.build` resolves it."""
    try:
        from ..teacher.cache.format import check_token_values, token_layout, token_row_bytes
    except ImportError:
        return None
    try:
        exact = check_token_values(k, dtype, value_bits, exact_k, curve)
        return token_row_bytes(token_layout(k, vocab, dtype, value_bits, exact, curve))
    except (TypeError, ValueError):
        return None


def _values_label(dtype: str, bits: int | None, curve: int | None, exact_k: int | None) -> str:
    """How the log-probabilities are stored, in words."""
    past = "" if exact_k is None else f" past the top {exact_k}"
    if bits:
        return f"{bits}-bit codes{past} ({dtype} ranges)"
    if curve:
        return f"a {curve}-term curve{past} ({dtype})"
    return dtype


def run_build_tokens(args: argparse.Namespace, config, src: Path) -> int:
    from ..teacher import TokenCache
    from ..teacher.cache.format import check_token_values
    from ..teacher.token_cache import trained_positions

    for flag, given in (("--mode", args.mode not in (None, "topk")), ("--views", bool(args.views)),
                        ("--features", args.features is not None), ("--temperature", args.temperature is not None)):
        if given:
            raise KDistillError(f"{flag} is for image caches; a language-model run's token cache stores the top "
                                "--k next tokens of every trained-on position at T=1 (the losses apply the "
                                "temperature)")
    tc = config.stages.distil.teacher_cache  # resolved for data.text: k, dtype, tail, batch_size
    k = args.k if args.k is not None else (tc.k if tc is not None else 64)
    dtype = args.dtype or (tc.dtype if tc is not None else "float16")
    config_values = {name: getattr(tc, name) if tc is not None else None
                     for name in ("value_bits", "curve", "exact_k")}
    if args.value_bits is not None or args.curve is not None:  # a flag's encoding replaces the config's
        config_values.update(value_bits=None, curve=None)
    bits = args.value_bits if args.value_bits is not None else config_values["value_bits"]
    curve = args.curve if args.curve is not None else config_values["curve"]
    exact_k = args.exact_k if args.exact_k is not None else config_values["exact_k"]
    try:  # what TokenCache.build would refuse, refused before the teacher is loaded
        check_token_values(k, dtype, bits, exact_k, curve)
    except (ValueError, TypeError) as e:
        raise KDistillError(f"{e} (--value-bits, --curve, --exact-k or the config's teacher_cache)") from None
    batch = args.batch_size or (tc.batch_size if tc is not None else 16)
    data, blocks, teacher = _text_source(args, src, config)
    head = teacher.get_output_embeddings() if hasattr(teacher, "get_output_embeddings") else None
    vocab = int(head.weight.shape[0]) if head is not None else data.vocab_size
    positions = int(trained_positions(blocks).sum())
    per = _token_row_bytes(k, vocab, dtype, bits, curve, exact_k)
    print(f"teacher {config.teacher.label()} over {data.name}: {len(blocks):,} sequences (the distil stage's), "
          f"{positions:,} trained-on positions, top {k} of {vocab:,} tokens, "
          + _values_label(dtype, bits, curve, exact_k)
          + (f", {per:,} B/position, {_mib(per * positions)}" if per is not None else ""))
    if args.dry_run:
        return 0
    extra = {name: value for name, value in (("value_bits", bits), ("curve", curve), ("exact_k", exact_k))
             if value is not None}
    started = time.perf_counter()
    try:
        cache = TokenCache.build(teacher, blocks, args.out, k=k, value_dtype=dtype, batch_size=batch,
                                 device=args.device or config.device, overwrite=args.overwrite, **extra)
    except (ValueError, TypeError) as e:
        raise KDistillError(str(e)) from None
    print(f"wrote {cache.path} in {time.perf_counter() - started:.1f} s ({cache.num_positions:,} positions, "
          f"{cache.bytes_per_position:g} B/position); distil from it with --set "
          f"stages.distil.teacher_cache.path={cache.path} stages.distil.teacher_cache.k={k} "
          f"stages.distil.teacher_cache.dtype={dtype}"
          + "".join(f" stages.distil.teacher_cache.{name}={value}" for name, value in extra.items()))
    return 0


def run_build(args: argparse.Namespace) -> int:
    from ..config import TeacherCacheConfig
    from ..distiller import loss_temperatures, tapped_layers
    from ..experiment import build_augment, build_losses, distil_inputs
    from ..teacher import TeacherCache, estimate_size

    text = _text_config(args)
    if text is not None:
        return run_build_tokens(args, *text)
    for flag, given in (("--value-bits", args.value_bits), ("--curve", args.curve), ("--exact-k", args.exact_k)):
        if given is not None:
            raise KDistillError(f"{flag} is for language-model token caches (a config with data.text)")
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


def _is_token_cache(path: str) -> bool:
    """Whether ``path`` holds a token cache (its manifest's format marker)."""
    from ..teacher.cache.format import MANIFEST, TOKEN_FORMAT

    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == TOKEN_FORMAT


def token_summary(cache) -> dict:
    """What ``kdistill cache info`` shows of a token cache."""
    m = cache.manifest
    return {
        "path": str(cache.path), "format": m["format"], "format_version": m["format_version"], "k": cache.k,
        "vocab_size": cache.vocab_size, "num_sequences": cache.num_sequences, "num_positions": cache.num_positions,
        "bytes_per_position": cache.bytes_per_position, "value_dtype": m["value_dtype"],
        "value_bits": m.get("value_bits"), "curve": m.get("curve"), "exact_k": m.get("exact_k"),
        "total_bytes": sum(int(f["bytes"]) for f in m["files"].values()),
        "teacher": m["teacher"], "dataset": m["dataset"], "kdistill_version": m.get("kdistill_version"),
    }


def _info_values(info: dict) -> str:
    """The ``values`` row of ``cache info``: the dtype, and the encoding past the exact ones."""
    exact_k = info.get("exact_k")
    past = f" past the top {exact_k}" if exact_k is not None else ""
    keys = f", exact_k={exact_k})" if exact_k is not None else ")"
    if info.get("value_bits"):
        return (f"{info['value_dtype']}, log-probabilities{past} as {info['value_bits']}-bit codes "
                f"(value_bits={info['value_bits']}{keys}")
    if info.get("curve"):
        return (f"{info['value_dtype']}, log-probabilities{past} as a {info['curve']}-term rank curve "
                f"(curve={info['curve']}{keys}")
    return info["value_dtype"]


def run_info_tokens(args: argparse.Namespace) -> int:
    from ..teacher import TokenCache

    info = token_summary(TokenCache.open(args.path, verify=False))
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    teacher = info["teacher"]
    rows = [
        ("path", info["path"]),
        ("kind", f"token cache (top-k next tokens of a language model, format {info['format_version']})"),
        ("k", f"{info['k']} of a vocabulary of {info['vocab_size']:,} tokens"),
        ("values", _info_values(info)),
        ("positions", f"{info['num_positions']:,} in {info['num_sequences']:,} sequences"),
        ("size", f"{info['bytes_per_position']:g} B/position, {_mib(info['total_bytes'])}"),
        ("teacher", f"{teacher.get('class', '?')} {teacher['fingerprint'][:23]}..."),
        ("data", f"{info['dataset']['fingerprint'][:23]}..."),
        ("built by", f"kdistill {info['kdistill_version']}"),
    ]
    for name, value in rows:
        print(f"{name:<9} {value}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from ..teacher import TeacherCache

    if _is_token_cache(args.path):
        return run_info_tokens(args)
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
    from ..teacher import TeacherCache, TokenCache

    started = time.perf_counter()
    if _is_token_cache(args.path):
        cache = TokenCache.open(args.path, verify=True)  # raises CacheError (exit 1) naming the bad file
        total = token_summary(cache)["total_bytes"]
        print(f"{cache.path}: token cache, every file matches its checksum ({_mib(total)}, "
              f"{time.perf_counter() - started:.1f} s)")
        return 0
    cached = TeacherCache.open(args.path, verify=True)  # raises CacheError (exit 1) naming the bad file
    print(f"{cached.path}: every file matches its checksum ({_mib(cached.describe()['total_bytes'])}, "
          f"{time.perf_counter() - started:.1f} s)")
    return 0
