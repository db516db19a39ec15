"""export: ONNX / TorchScript files that compute what the model computes; int8; clear errors.

Tiny models trained for a few steps on separable synthetic (1, 8, 8) images, so accuracy
(and the accuracy lost to int8) means something.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

from kdistill.bench import count_onnx_parameters, count_parameters
from kdistill.errors import ExportParityError, KDistillError, MissingExtraError, ModelInputError
from kdistill.export import (
    check_parity,
    evaluate_exported,
    export_format,
    export_onnx,
    export_torchscript,
    load_exported,
    quantize_int8,
    require_extra,
)
from kdistill.models import build_model

HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime", "onnxscript"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason='needs the export extra: pip install "kdistill[export]"')

# the TorchScript paths are deprecated upstream (tests/test_export_pt2.py checks the warning)
pytestmark = pytest.mark.filterwarnings("ignore:TorchScript.*deprecated in PyTorch:DeprecationWarning")

SHAPE = (1, 8, 8)
CLASSES = 4


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy (n, 1, 8, 8) images whose class is the bright 4x4 quadrant: (x, y)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = torch.randn(n, *SHAPE, generator=g)
    for c in range(CLASSES):
        r, col = divmod(c, 2)
        x[y == c, 0, 4 * r : 4 * r + 4, 4 * col : 4 * col + 4] += 1.0
    return x, y


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 60, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        i = torch.randint(0, len(x), (64,))
        loss = nn.functional.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        return float((model(x).argmax(-1) == y).float().mean())


@pytest.fixture(scope="module")
def data():
    return make_data(1024, seed=0), make_data(512, seed=1)


@pytest.fixture(scope="module")
def cnn(data):
    (x, y), _ = data
    torch.manual_seed(0)
    return train(build_model("classic_student", num_classes=CLASSES, input_size=8), x, y)


@pytest.fixture(scope="module")
def mlp(data):
    (x, y), _ = data
    torch.manual_seed(0)
    return train(build_model("mlp", hidden=(128,), num_classes=CLASSES, input_size=8), x, y)


@pytest.fixture(scope="module")
def cnn_onnx(cnn, data, tmp_path_factory):
    """The CNN exported once with the default (dynamo) exporter."""
    (x, _), _ = data
    return export_onnx(cnn, x[:4], tmp_path_factory.mktemp("onnx") / "cnn.onnx")


def test_models_learned_something(cnn, mlp, data):
    _, (xt, yt) = data
    assert accuracy(cnn, xt, yt) > 0.8 and accuracy(mlp, xt, yt) > 0.8


# ---------------------------------------------------------------------------------- ONNX


@needs_onnx
def test_onnx_parity_and_dynamic_batch(cnn, cnn_onnx, data):
    import onnx

    _, (xt, _) = data
    report = check_parity(cnn, cnn_onnx, xt)
    assert report["max_abs_diff"] <= 1e-4
    assert report["tolerance"] == 1e-4 and report["samples"] == len(xt) and report["argmax_agreement"] == 1.0
    graph = onnx.load(str(cnn_onnx)).graph
    assert [i.name for i in graph.input] == ["input"] and [o.name for o in graph.output] == ["logits"]
    assert count_onnx_parameters(cnn_onnx) == count_parameters(cnn)
    f = load_exported(cnn_onnx)
    assert f.input_shape == SHAPE and f.format == "onnx"
    for batch in (1, 7):  # the batch axis is free; numpy arrays work too
        out = f(xt[:batch].numpy())
        assert isinstance(out, torch.Tensor) and out.shape == (batch, CLASSES)


@needs_onnx
def test_legacy_exporter_parity_and_atomic_write(mlp, data, tmp_path):
    (x, _), (xt, _) = data
    mlp.train()  # exported in eval mode; the caller's mode is kept
    path = export_onnx(mlp, x[:1], tmp_path / "sub" / "mlp.onnx", dynamo=False, opset=17)
    assert mlp.training
    mlp.eval()
    assert path == tmp_path / "sub" / "mlp.onnx"
    assert os.listdir(path.parent) == ["mlp.onnx"]  # no temp file left behind
    assert check_parity(mlp, path, xt, batch_size=100)["max_abs_diff"] <= 1e-4


@needs_onnx
def test_dynamo_failure_falls_back_to_the_torchscript_exporter(mlp, data, tmp_path, monkeypatch):
    import kdistill.export as export_module

    (x, _), (xt, _) = data
    real = export_module._onnx_export
    used = []

    def flaky(model, example, path, opset, dynamo):
        used.append(dynamo)
        if dynamo:
            raise RuntimeError("unsupported operator\nlong trace")
        return real(model, example, path, opset, dynamo)

    monkeypatch.setattr(export_module, "_onnx_export", flaky)
    with pytest.warns(RuntimeWarning, match=r"dynamo ONNX exporter failed \(RuntimeError: unsupported operator\);"):
        path = export_onnx(mlp, x[:2], tmp_path / "m.onnx")
    assert used == [True, False] and check_parity(mlp, path, xt)["max_abs_diff"] <= 1e-4
    used.clear()
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # no onnxscript: the TorchScript-based exporter
    export_onnx(mlp, x[:2], tmp_path / "m.onnx")
    assert used == [False]
    with pytest.raises(MissingExtraError, match="onnxscript"):
        export_onnx(mlp, x[:2], tmp_path / "m.onnx", dynamo=True)


@needs_onnx
def test_evaluate_exported_matches_pytorch(cnn, cnn_onnx, data):
    _, (xt, yt) = data
    assert evaluate_exported(cnn_onnx, xt, yt, batch_size=100) == pytest.approx(accuracy(cnn, xt, yt), abs=1e-9)
    assert evaluate_exported(cnn_onnx, xt.numpy(), yt.numpy()) == pytest.approx(accuracy(cnn, xt, yt), abs=1e-9)


@needs_onnx
@pytest.mark.parametrize("suffix", [".onnx", ".pt"])
def test_file_of_another_model_fails_parity(cnn, data, tmp_path, suffix):
    (x, y), (xt, _) = data
    other = train(build_model("classic_student", num_classes=CLASSES, input_size=8), x, y, steps=5, seed=1)
    if suffix == ".onnx":
        def export(*args):
            return export_onnx(*args, dynamo=False)  # the fast exporter; dynamo is tested above
    else:
        export = export_torchscript
    path = export(other, x[:2], tmp_path / f"model{suffix}")  # a stale file, or another model's
    with pytest.raises(ExportParityError, match=r"max \|logit difference\| .* > tolerance 0.0001") as err:
        check_parity(cnn, path, xt[:64])
    assert "export this model again" in str(err.value) and isinstance(err.value, KDistillError)


def test_file_with_other_output_shape_fails_parity(cnn, data, tmp_path):
    (x, _), (xt, _) = data
    path = export_torchscript(build_model("classic_student", num_classes=3, input_size=8), x[:2], tmp_path / "m.pt")
    with pytest.raises(ExportParityError, match=r"logits of shape \(16, 3\) but the PyTorch model returns \(16, 4\)"):
        check_parity(cnn, path, xt[:16])


# ---------------------------------------------------------------------------------- TorchScript


@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_torchscript_parity(name, request, data, tmp_path):
    model = request.getfixturevalue(name)
    (x, _), (xt, yt) = data
    path = export_torchscript(model, x[:3], tmp_path / f"{name}.ts")
    assert check_parity(model, path, xt)["max_abs_diff"] <= 1e-5
    assert evaluate_exported(path, xt, yt) == pytest.approx(accuracy(model, xt, yt), abs=1e-9)
    assert load_exported(path).input_shape == SHAPE


# ---------------------------------------------------------------------------------- int8


@needs_onnx
def test_int8_static_onnx_quantizes_convolutions(cnn, cnn_onnx, data):
    import onnx

    (x, _), (xt, yt) = data
    q = quantize_int8(cnn_onnx, calibration=x[:256])
    assert q == cnn_onnx.with_name("cnn.int8.onnx")
    assert q.stat().st_size < 0.75 * cnn_onnx.stat().st_size
    graph = onnx.load(str(q)).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) == 2 and all(producers.get(n.input[1]) == "DequantizeLinear" for n in convs)
    assert all(init.data_type != onnx.TensorProto.FLOAT or len(init.dims) <= 1 for init in graph.initializer)
    float_acc, int8_acc = evaluate_exported(cnn_onnx, xt, yt), evaluate_exported(q, xt, yt)
    assert abs(int8_acc - float_acc) <= 0.03, (float_acc, int8_acc)
    assert check_parity(cnn, q, xt, atol=float("inf"))["argmax_agreement"] >= 0.95
    with pytest.raises(ExportParityError):  # int8 is not float-exact
        check_parity(cnn, q, xt)


@needs_onnx
def test_int8_dynamic_onnx_from_module(mlp, data, tmp_path):
    (x, _), (xt, yt) = data
    float_path = export_onnx(mlp, x[:2], tmp_path / "mlp.onnx", dynamo=False)
    q = quantize_int8(mlp, tmp_path / "mlp.int8.onnx", example_input=x[:2], method="dynamic")
    assert q.stat().st_size < 0.5 * float_path.stat().st_size
    assert abs(evaluate_exported(q, xt, yt) - accuracy(mlp, xt, yt)) <= 0.03
    assert sorted(os.listdir(tmp_path)) == ["mlp.int8.onnx", "mlp.onnx"]


def test_int8_torchscript_quantizes_linear_layers(mlp, data, tmp_path):
    (x, _), (xt, yt) = data
    float_path = export_torchscript(mlp, x[:2], tmp_path / "mlp.pt")
    q = quantize_int8(mlp, tmp_path / "mlp.int8.pt", calibration=x[:8])
    assert q.stat().st_size < 0.6 * float_path.stat().st_size
    assert abs(evaluate_exported(q, xt, yt) - accuracy(mlp, xt, yt)) <= 0.03
    assert check_parity(mlp, q, xt, atol=float("inf"))["argmax_agreement"] >= 0.95


# ---------------------------------------------------------------------------------- errors


def test_missing_extra_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    with pytest.raises(MissingExtraError, match=r'onnxruntime.*pip install "kdistill\[export\]"') as err:
        require_extra("onnxruntime")
    assert isinstance(err.value, ImportError)
    path = tmp_path / "m.onnx"
    path.write_bytes(b"not used")
    with pytest.raises(MissingExtraError, match=r"kdistill\[export\]"):
        load_exported(path)
    with pytest.raises(MissingExtraError, match=r"'no_such_module_kd'.*kdistill\[other\]"):
        require_extra("no_such_module_kd", extra="other")


def test_export_and_bench_import_without_the_extra(monkeypatch, cnn, data, tmp_path):
    import kdistill

    for name in ("onnx", "onnxruntime", "onnxscript"):  # as if not installed
        monkeypatch.setitem(sys.modules, name, None)
    for name in ("export", "bench"):  # re-import both; everything is put back afterwards
        monkeypatch.delitem(sys.modules, f"kdistill.{name}", raising=False)
        monkeypatch.setattr(kdistill, name, getattr(kdistill, name, None), raising=False)
    fresh_export = importlib.import_module("kdistill.export")
    fresh_bench = importlib.import_module("kdistill.bench")
    (x, _), _ = data
    path = fresh_export.export_torchscript(cnn, x[:2], tmp_path / "m.pt")  # TorchScript needs no extra
    assert fresh_bench.benchmark_torchscript(path, SHAPE, throughput_batch=4, repeats=2)["size_bytes"] > 0
    with pytest.raises(MissingExtraError, match=r"'onnx'.*kdistill\[export\]"):
        fresh_export.export_onnx(cnn, x[:2], tmp_path / "m.onnx")


def test_unknown_format_and_missing_file(cnn, data, tmp_path):
    (x, _), _ = data
    with pytest.raises(ValueError, match=r"unknown export format for .*model\.txt.*\.onnx"):
        export_format(tmp_path / "model.txt")
    with pytest.raises(ValueError, match="unknown export format"):
        load_exported(tmp_path / "model.h5")
    with pytest.raises(FileNotFoundError, match=r"missing\.onnx.* does not exist; export one first"):
        load_exported(tmp_path / "missing.onnx")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_parity(cnn, tmp_path / "missing.pt", x[:4])
    with pytest.raises(ValueError, match="use export_onnx"):
        export_torchscript(cnn, x[:2], tmp_path / "m.onnx")
    with pytest.raises(ValueError, match="use export_torchscript"):
        export_onnx(cnn, x[:2], tmp_path / "m.pt")


@pytest.mark.parametrize("suffix", [".pt", pytest.param(".onnx", marks=needs_onnx)])
def test_corrupt_file_is_a_clear_error(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x00 not a model")
    with pytest.raises(KDistillError, match=r"model\.(pt|onnx).*(corrupt|not an ONNX model)"):
        load_exported(path)


def test_wrong_example_shapes(cnn, data, tmp_path):
    (x, _), _ = data
    with pytest.raises(ModelInputError, match=r"per-sample shape \(1, 28, 28\).*expects \(1, 8, 8\)"):
        export_torchscript(cnn, torch.zeros(2, 1, 28, 28), tmp_path / "m.pt")
    with pytest.raises(ModelInputError, match=r"batch axis first.*got shape \(8,\)"):
        export_torchscript(cnn, torch.zeros(8), tmp_path / "m.pt")
    with pytest.raises(TypeError, match="torch.Tensor or numpy array, got list"):
        export_torchscript(cnn, [[0.0]], tmp_path / "m.pt")
    no_shape = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))  # no input_shape attribute: the model decides
    with pytest.raises(ModelInputError, match=r"rejected example_input of shape \(2, 1, 4, 4\)"):
        export_torchscript(no_shape, torch.zeros(2, 1, 4, 4), tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()
    path = export_torchscript(cnn, x[:2], tmp_path / "m.pt")
    with pytest.raises(ModelInputError, match=r"m\.pt expects inputs of shape \(B, 1, 8, 8\), got \(2, 1, 9, 9\)"):
        load_exported(path)(torch.zeros(2, 1, 9, 9))
    with pytest.raises(ValueError, match=r"y must be labels of shape \(4,\)"):
        evaluate_exported(path, x[:4], torch.zeros(3))


def test_quantize_int8_argument_errors(cnn, data, tmp_path):
    (x, _), _ = data
    with pytest.raises(ValueError, match="method must be 'auto', 'static' or 'dynamic', got 'fp8'"):
        quantize_int8(cnn, tmp_path / "q.onnx", method="fp8")
    with pytest.raises(ValueError, match="method='static' needs calibration"):
        quantize_int8(cnn, tmp_path / "q.onnx", method="static")
    ts = export_torchscript(cnn, x[:2], tmp_path / "m.pt")
    with pytest.raises(ValueError, match="pass the nn.Module as source"):
        quantize_int8(ts, tmp_path / "q.pt")
    with pytest.raises(ValueError, match="needs example_input"):
        quantize_int8(cnn, tmp_path / "q.pt")
    with pytest.raises(FileNotFoundError):
        quantize_int8(tmp_path / "missing.onnx", calibration=x[:8])


@needs_onnx
def test_quantize_int8_checks_calibration_shape(cnn_onnx, tmp_path):
    with pytest.raises(ModelInputError, match=r"calibration inputs have shape \(8, 1, 9, 9\).*expects \(N, 1, 8, 8\)"):
        quantize_int8(cnn_onnx, tmp_path / "q.onnx", calibration=np.zeros((8, 1, 9, 9), np.float32))
