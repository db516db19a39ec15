"""``kdistill layers MODEL``: every layer path of a model with its output shape, the names
feature-distillation losses tap (``student_layer: layer3``, ``teacher_layer: fc:input``).

``MODEL`` is a built-in model name (``resnet8x4``; ``--input-shape``, ``--num-classes``
and builder keyword arguments with ``--kw key=value``) or a run directory with
``--stage teacher|scratch|distil``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..errors import KDistillError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("layers", help="list a model's layer paths and output shapes (for feature taps)",
                       description=__doc__)
    p.add_argument("model", metavar="MODEL", help="a built-in model name, or a run directory")
    p.add_argument("--input-shape", default=None, help="per-sample input shape, e.g. 3,32,32 (default: 1,28,28)")
    p.add_argument("--num-classes", type=int, default=10, help="classes of a built-in model's output layer")
    p.add_argument("--kw", action="append", default=[], metavar="KEY=VALUE",
                   help="builder keyword arguments (values parsed as YAML), e.g. --kw width=2; repeatable")
    p.add_argument("--stage", default="distil", choices=["teacher", "scratch", "distil"],
                   help="which model of a run directory")
    p.add_argument("--depth", type=int, default=None,
                   help="only paths of at most this many parts, e.g. 1: layer3 but not layer3.0 (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..config import yaml_load

    from ..taps import list_layers

    target = Path(args.model)
    if target.is_dir():
        from ..experiment import load_data, load_stage_model
        from ..run.directory import read_run_config

        data = load_data(read_run_config(target))
        model = load_stage_model(target, args.stage, data=data)
        shape = tuple(data.input_shape)
    else:
        from ..models import MODELS, build_model

        if args.model not in MODELS:
            import difflib

            close = difflib.get_close_matches(args.model, MODELS, n=3)
            raise KDistillError(f"{args.model!r} is neither a run directory nor a model name"
                                + (f" (did you mean {', '.join(close)}?)" if close else "")
                                + f"; models: {', '.join(MODELS)}")
        shape = (1, 28, 28)
        if args.input_shape:
            try:
                shape = tuple(int(v) for v in args.input_shape.split(","))
            except ValueError:
                raise KDistillError(f"--input-shape must be integers separated by commas (3,32,32), got {args.input_shape!r}") from None
        kwargs = {}
        for item in args.kw:
            key, sep, value = item.partition("=")
            if not sep:
                raise KDistillError(f"--kw {item!r} must look like key=value")
            kwargs[key] = yaml_load(value)
        model = build_model(args.model, num_classes=args.num_classes, in_channels=shape[0], input_size=shape[-1], **kwargs)
    rows = list_layers(model, torch.zeros(2, *shape))
    if args.depth is not None:
        rows = [r for r in rows if r["path"].count(".") < args.depth]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    width = max(len(r["path"]) for r in rows) if rows else 4
    print(f"{'path':<{width}}  {'type':<18} {'output shape (batch 2)':<24} parameters")
    for r in rows:
        shape_text = "x".join(str(d) for d in r["output_shape"]) if r["output_shape"] else "-"
        print(f"{r['path']:<{width}}  {r['type']:<18} {shape_text:<24} {r['parameters']:,}")
    print(f"\ninput {'x'.join(map(str, (2, *shape)))}; tap a layer's input with '<path>:input' (e.g. the classifier's)")
    return 0
