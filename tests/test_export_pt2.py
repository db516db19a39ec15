"""torch.export (.pt2) files compute what the model computes; the deprecated TorchScript
and torch.ao paths warn when picked, and only then."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from kdistill.errors import ExportParityError, KDistillError, ModelInputError
from kdistill.export import (
    check_parity,
    evaluate_exported,
    export_format,
    export_onnx,
    export_pt2,
    export_torchscript,
    load_exported,
    quantize_int8,
)
from kdistill.models import build_model

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return build_model("classic_student", num_classes=4, input_size=8).eval()


@pytest.fixture(scope="module")
def inputs():
    return torch.randn(40, *SHAPE, generator=torch.Generator().manual_seed(0))


def test_pt2_round_trip_matches_the_model_at_any_batch_size(cnn, inputs, tmp_path):
    path = export_pt2(cnn, inputs[:3], tmp_path / "sub" / "student.pt2")
    assert export_format(path) == "pt2" and [p.name for p in path.parent.iterdir()] == ["student.pt2"]
    program = torch.export.load(str(path))  # plain PyTorch reads it
    with torch.inference_mode():
        for n in (1, 5, 40):  # the batch axis is free
            assert torch.allclose(program.module()(inputs[:n]), cnn(inputs[:n]), atol=1e-6)
    loaded = load_exported(path)
    assert loaded.format == "pt2" and loaded.input_shape == SHAPE
    report = check_parity(cnn, path, inputs, batch_size=16)
    assert report["max_abs_diff"] <= 1e-6 and report["argmax_agreement"] == 1.0
    y = cnn(inputs).argmax(-1)
    assert evaluate_exported(path, inputs, y) == 1.0


def test_pt2_export_keeps_the_callers_model_and_checks_its_input(cnn, inputs, tmp_path):
    model = build_model("mlp", hidden=(8,), num_classes=4, input_size=8).train()
    export_pt2(model, inputs[:2], tmp_path / "m.pt2")
    assert model.training  # exported from an eval copy
    with pytest.raises(ModelInputError, match=r"example_input has per-sample shape \(1, 6, 6\)"):
        export_pt2(cnn, torch.randn(2, 1, 6, 6), tmp_path / "bad.pt2")
    with pytest.raises(ValueError, match="export_pt2 writes .pt2 files"):
        export_pt2(cnn, inputs[:2], tmp_path / "m.onnx")
    with pytest.raises(ValueError, match=r"use export_pt2\(\) for \.pt2"):
        export_onnx(cnn, inputs[:2], tmp_path / "m.pt2")
    with pytest.raises(ValueError, match="not .pt2"):
        quantize_int8(cnn, tmp_path / "m.int8.pt2", example_input=inputs[:2])
    with pytest.raises(ModelInputError, match=r"expects inputs of shape \(B, 1, 8, 8\)"):
        load_exported(tmp_path / "m.pt2")(torch.randn(2, 1, 6, 6))


def test_a_pt2_of_another_model_fails_parity_and_a_corrupt_one_is_clear(cnn, inputs, tmp_path):
    torch.manual_seed(1)
    other = build_model("classic_student", num_classes=4, input_size=8)
    path = export_pt2(other, inputs[:2], tmp_path / "other.pt2")
    with pytest.raises(ExportParityError, match="export this model again"):
        check_parity(cnn, path, inputs)
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"\x00 not a model")
    with pytest.raises(KDistillError, match=r"bad\.pt2.*corrupt"):
        load_exported(bad)


def test_a_model_torch_export_cannot_capture_is_a_clear_error(inputs, tmp_path):
    class DataDependent(nn.Module):
        def forward(self, x):
            flat = x.flatten(1)
            return flat[:, :4] if flat.sum() > 0 else -flat[:, :4]  # control flow on values

    with pytest.raises(KDistillError, match="torch.export could not export the model"):
        export_pt2(DataDependent(), inputs[:2], tmp_path / "dd.pt2")
    assert not (tmp_path / "dd.pt2").exists()


def test_the_deprecated_paths_warn_only_when_picked(cnn, inputs, tmp_path):
    with pytest.warns(DeprecationWarning, match=r"TorchScript export \(torch.jit.trace\) is deprecated.*export_pt2"):
        export_torchscript(cnn, inputs[:2], tmp_path / "m.pt")
    with pytest.warns(DeprecationWarning, match=r"torch.ao.quantization.quantize_dynamic.*deprecated.*ONNX"):
        quantize_int8(cnn, tmp_path / "m.int8.pt", example_input=inputs[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all on the torch.export path
        export_pt2(cnn, inputs[:2], tmp_path / "m.pt2")
        check_parity(cnn, tmp_path / "m.pt2", inputs[:4])


def test_importing_kdistill_leaves_the_warning_filters_alone():
    import subprocess
    import sys

    code = ("import warnings, torch, numpy, matplotlib.pyplot, safetensors.torch; "  # they add filters of their own
            "before = list(warnings.filters); "
            "import kdistill, kdistill.export, kdistill.bench, kdistill.trackers, kdistill.data.augment, kdistill.cli, "
            "kdistill.experiment; "
            "assert warnings.filters == before, [f for f in warnings.filters if f not in before]")
    subprocess.run([sys.executable, "-c", code], check=True)
