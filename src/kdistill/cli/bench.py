"""``kdistill bench MODEL_OR_RUN``: parameters, size on disk, latency at batch 1 (median,
p90) and throughput at a large batch, on the CPU, as JSON.

``MODEL_OR_RUN`` is a run directory (its teacher, scratch and distilled models in PyTorch,
plus every exported ``student*.onnx`` / ``student*.pt`` in it, run by onnxruntime /
TorchScript), an exported file (``.onnx``, ``.pt``/``.ts`` TorchScript; give
``--input-shape``), or a built-in model name (``classic_student``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..atomic import atomic_write_text
from ..errors import KDistillError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="latency, throughput and size of models, runs or exported files",
                       description=__doc__)
    p.add_argument("target", metavar="MODEL_OR_RUN", help="a run directory, an exported .onnx/.pt file or a model name")
    p.add_argument("--input-shape", default=None,
                   help="per-sample input shape, e.g. 1,28,28 (default: a run's data; 1,28,28 for a model name; "
                        "needed for a file)")
    p.add_argument("--latency-batch", type=int, default=1, help="batch size of the latency measurement")
    p.add_argument("--throughput-batch", type=int, default=256, help="batch size of the throughput measurement")
    p.add_argument("--repeats", type=int, default=50, help="timed forward passes per measurement (after warm-up)")
    p.add_argument("--threads", type=int, default=None, help="PyTorch / onnxruntime CPU threads (default: their choice)")
    p.add_argument("--json", dest="json_out", default=None, help="write the results here (default: stdout only)")
    p.set_defaults(run=run)


def _shape(text: str | None, fallback=None) -> tuple[int, ...]:
    if text is None:
        if fallback is None:
            raise KDistillError("--input-shape is needed for this target, e.g. --input-shape 1,28,28")
        return tuple(fallback)
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise KDistillError(f"--input-shape must be integers separated by commas (1,28,28), got {text!r}") from None


def _bench_file(path: Path, shape, kw) -> dict:
    from ..bench import benchmark_onnx, benchmark_pt2, benchmark_torchscript
    from ..export import export_format

    runtime, fn = {"onnx": ("onnxruntime", benchmark_onnx), "pt2": ("torch.export", benchmark_pt2),
                   "torchscript": ("torchscript", benchmark_torchscript)}[export_format(path)]
    return {"runtime": runtime, **fn(path, shape, **kw)}


def run(args: argparse.Namespace) -> int:
    from ..bench import benchmark_model
    from ..runtime import machine_description, set_threads

    set_threads(args.threads)
    kw = dict(latency_batch=args.latency_batch, throughput_batch=args.throughput_batch, repeats=args.repeats)
    target = Path(args.target)
    results: dict[str, dict] = {}
    if target.is_dir():
        from ..experiment import load_data, load_stage_model
        from ..run.directory import read_run_config

        config = read_run_config(target)
        data = load_data(config)
        shape = _shape(args.input_shape, data.input_shape)
        for stage in ("teacher", "scratch", "distil"):
            if (target / "stages" / stage / "done.json").is_file():
                model = load_stage_model(target, stage, data=data)
                results[f"{stage}/pytorch"] = {"runtime": "pytorch", **benchmark_model(model, shape, **kw)}
        for f in sorted(target.iterdir()):
            if f.name.startswith("student") and f.suffix in (".onnx", ".pt2", ".pt"):
                results[f"{f.name}"] = _bench_file(f, shape, kw)
    elif target.is_file():
        results[target.name] = _bench_file(target, _shape(args.input_shape), kw)
    else:
        from ..models import MODELS, build_model

        if args.target not in MODELS:
            raise KDistillError(f"{args.target!r} is not a run directory, an exported file or a model name "
                                f"({', '.join(MODELS)})")
        shape = _shape(args.input_shape, (1, 28, 28))
        model = build_model(args.target, in_channels=shape[0], input_size=shape[-1])
        results[args.target] = {"runtime": "pytorch", **benchmark_model(model, shape, **kw)}
    out = {"target": str(args.target), "results": results, "machine": machine_description()}
    text = json.dumps(out, indent=1)
    print(text)
    if args.json_out:
        atomic_write_text(args.json_out, text + "\n")
    return 0
