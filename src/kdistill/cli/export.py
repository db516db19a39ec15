"""``kdistill export RUN_DIR --format onnx|pt2|torchscript|hf [--int8]``: the distilled student
alone (no teacher, no adapters, no loss modules) in the format it will be deployed in.

A language-model run's models export with ``--format hf``: a Hugging Face model directory
(``save_pretrained``, with the run's tokenizer), loaded back and compared with the
PyTorch model on held-out sequences.

The export is checked against PyTorch on held-out test inputs: the largest absolute
difference of the logits is reported and the command fails above ``--atol``. With
``--int8`` the exported model is also quantized (ONNX: static, calibrated on training
samples, so convolutions run in int8 too; TorchScript: dynamic, linear layers only) and
the accuracy change on the test set is reported. Results go to ``RUN_DIR/export.json``
(one entry per ``<stage>/<format>``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..atomic import atomic_write_text
from ..errors import KDistillError

SUFFIX = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".pt", "hf": "_hf"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export the distilled student (ONNX, torch.export .pt2, TorchScript; optional int8) with parity checks",
                       description=__doc__)
    p.add_argument("run_dir", help="a finished run directory")
    p.add_argument("--format", choices=sorted(SUFFIX), default="onnx",
                   help="file format: onnx (ONNX Runtime), pt2 (torch.export), torchscript (deprecated upstream); "
                        "hf (a Hugging Face model directory, for language-model runs)")
    p.add_argument("--int8", action="store_true", help="also write an int8-quantized model and report its accuracy change")
    p.add_argument("--stage", default="distil", choices=["distil", "scratch", "teacher"],
                   help="which model of the run to export")
    p.add_argument("--out", default=None,
                   help="output file (default: RUN_DIR/student.onnx, .pt2 or .pt; teacher.*, scratch.* for those stages)")
    p.add_argument("--atol", type=float, default=1e-4, help="largest allowed |exported - PyTorch| logit difference")
    p.add_argument("--samples", type=int, default=1000, help="held-out test samples for the parity check")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..experiment import load_data, load_stage_model
    from ..run.directory import read_run_config
    from ..export import (check_parity, evaluate_exported, export_onnx, export_pt2, export_torchscript, quantize_int8,
                          require_extra)

    # 1. set up: the model and held-out data
    config = read_run_config(Path(args.run_dir))
    if (config.data.text is not None) != (args.format == "hf"):
        raise KDistillError(
            "a language-model run exports with --format hf (a Hugging Face model directory)"
            if config.data.text is not None else
            "--format hf is for language-model runs (data.text); export this run with onnx, pt2 or torchscript")
    if args.format == "hf":
        return _export_hf(args, config)
    if args.int8 and args.format == "pt2":
        raise KDistillError("--int8 quantizes ONNX (static, calibrated) and TorchScript files; for a .pt2 export "
                            "leave --int8 out, or export --format onnx --int8")
    if args.format == "onnx":
        require_extra("onnx")
        require_extra("onnxruntime")
    run_dir = Path(args.run_dir)
    config = read_run_config(run_dir)
    data = load_data(config)
    model = load_stage_model(run_dir, args.stage, data=data)
    name = "student" if args.stage == "distil" else args.stage
    out = Path(args.out) if args.out else run_dir / f"{name}{SUFFIX[args.format]}"
    x_test, y_test = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    held_out = x_test[: args.samples]
    # 2. export and check parity
    export = {"onnx": export_onnx, "pt2": export_pt2, "torchscript": export_torchscript}[args.format]
    export(model, held_out[:2], out)
    parity = check_parity(model, out, held_out, atol=args.atol)
    with torch.inference_mode():
        torch_acc = float((model(x_test).argmax(-1) == y_test).float().mean())
    result = {"stage": args.stage, "format": args.format, "path": str(out), "size_bytes": out.stat().st_size,
              "parity": parity, "test_accuracy_pytorch": torch_acc,
              "test_accuracy_exported": evaluate_exported(out, x_test, y_test)}
    print(f"exported the {'distilled student' if args.stage == 'distil' else args.stage} to {out} ({out.stat().st_size:,} bytes); max |exported - PyTorch| = "
          f"{parity['max_abs_diff']:.2e} on {parity['samples']} test samples (tolerance {args.atol:g}); "
          f"argmax agreement {100 * parity['argmax_agreement']:.2f}%")
    # 3. int8: quantize, then the accuracy change on the whole test set
    if args.int8:
        int8_path = out.with_name(out.stem + ".int8" + out.suffix)
        calibration = torch.from_numpy(data.x_train[:512])
        source = out if args.format == "onnx" else model
        quantize_int8(source, int8_path, calibration=calibration, example_input=held_out[:2])
        acc8 = evaluate_exported(int8_path, x_test, y_test)
        result["int8"] = {"path": str(int8_path), "size_bytes": int8_path.stat().st_size, "test_accuracy": acc8,
                          "accuracy_change_points": 100 * (acc8 - result["test_accuracy_exported"])}
        print(f"int8: {int8_path} ({int8_path.stat().st_size:,} bytes, {out.stat().st_size / int8_path.stat().st_size:.1f}x "
              f"smaller); test accuracy {100 * acc8:.2f}% vs {100 * result['test_accuracy_exported']:.2f}% float "
              f"({result['int8']['accuracy_change_points']:+.2f} points)")
    _record(run_dir, f"{args.stage}/{args.format}", result)
    return 0


def _record(run_dir: Path, key: str, result: dict) -> None:
    """Add ``result`` to ``RUN_DIR/export.json`` under ``key``: one entry per format and stage
    (exporting ONNX then TorchScript keeps both)."""
    record = run_dir / "export.json"
    previous = json.loads(record.read_text()) if record.is_file() else {}
    previous[key] = result
    atomic_write_text(record, json.dumps(previous, indent=1))


def _export_hf(args: argparse.Namespace, config) -> int:
    """A language-model run's stage as a Hugging Face model directory, checked after loading back."""
    from ..experiment import load_stage_model
    from ..text_experiment import export_hf, load_text_data, run_tokenizer

    if args.int8:
        raise KDistillError("--int8 is for onnx and torchscript exports; a Hugging Face directory keeps the weights "
                            "as trained")
    run_dir = Path(args.run_dir)
    model = load_stage_model(run_dir, args.stage)
    name = "student" if args.stage == "distil" else args.stage
    out = Path(args.out) if args.out else run_dir / f"{name}_hf"
    data = load_text_data(config, run_dir)
    parity = export_hf(model, run_tokenizer(run_dir, config), data.held_out, out, samples=min(args.samples, 256))
    if parity["max_abs_diff"] > args.atol:
        raise KDistillError(f"the model loaded back from {out} differs from the trained one by "
                            f"{parity['max_abs_diff']:.2e} > --atol {args.atol:g}")
    result = {"stage": args.stage, "format": "hf", "path": str(out),
              "size_bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file()), "parity": parity}
    print(f"exported the {'distilled student' if args.stage == 'distil' else args.stage} to {out}/ "
          f"({result['size_bytes']:,} bytes with its tokenizer); loaded back, max |difference| = "
          f"{parity['max_abs_diff']:.2e} on {parity['sequences']} held-out sequences")
    _record(run_dir, f"{args.stage}/hf", result)
    return 0
