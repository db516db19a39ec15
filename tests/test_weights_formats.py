"""load_weights: a teacher's weights from a kdistill checkpoint, a PyTorch state_dict
(plain, wrapped, prefixed) or a safetensors file, loaded strictly or not at all."""

from __future__ import annotations

import hashlib
import os
import random

import pytest
import torch
from safetensors.torch import save_file, save_model
from torch import nn

from kdistill.checkpoint import load_checkpoint, load_weights, read_checkpoint, save_checkpoint
from kdistill.errors import CheckpointError


def _net(seed: int, width: int = 4) -> nn.Sequential:
    """A tiny conv net with a BatchNorm (float and int64 buffers) and trained-looking stats."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, width, 3), nn.BatchNorm2d(width), nn.ReLU(), nn.Flatten(), nn.Linear(width * 16, 5)
    )
    model.train()
    model(torch.randn(2, 3, 6, 6))  # moves running_mean / running_var / num_batches_tracked
    return model.eval()


_X = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(9))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        assert torch.equal(a(_X), b(_X))


def _assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} was modified by a failed load"


@pytest.mark.parametrize("name", ["teacher.pt", "teacher.pth", "pytorch_model.bin", "weights"])
def test_plain_state_dict_round_trip(tmp_path, name):
    source, fresh = _net(0), _net(1)
    path = tmp_path / name
    torch.save(source.state_dict(), path)
    info = load_weights(path, fresh)
    _assert_same_weights(source, fresh)
    assert info["format"] == "state_dict"
    assert info["path"] == str(path)
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["tensors"] == len(source.state_dict()) == 9
    assert info["stripped_prefix"] is None and info["wrapper"] is None and info["cast_from"] is None


@pytest.mark.parametrize("name", ["teacher.safetensors", "model.bin"])  # by name, by content
def test_safetensors_round_trip(tmp_path, name):
    source, fresh = _net(0), _net(1)
    path = tmp_path / name
    save_file(source.state_dict(), str(path))
    info = load_weights(path, fresh)
    _assert_same_weights(source, fresh)
    assert info["format"] == "safetensors"
    assert info["tensors"] == 9 and info["cast_from"] is None


def test_torch_file_named_safetensors_is_read_by_content(tmp_path):
    source, fresh = _net(0), _net(1)
    path = tmp_path / "misnamed.safetensors"
    torch.save(source.state_dict(), path)
    assert load_weights(path, fresh)["format"] == "state_dict"
    _assert_same_weights(source, fresh)


def test_safetensors_save_model_with_tied_weights(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(6, 4)
            self.head = nn.Linear(4, 6, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, x):
            return self.head(self.embed(x))

    torch.manual_seed(0)
    source = Tied()
    torch.manual_seed(1)
    fresh = Tied()
    path = tmp_path / "tied.safetensors"
    save_model(source, str(path))  # writes the shared tensor once
    info = load_weights(path, fresh)
    assert torch.equal(fresh.embed.weight, source.embed.weight)
    assert fresh.head.weight is fresh.embed.weight  # still tied
    assert info["tensors"] == 2


def test_kdistill_checkpoint_round_trip_with_metadata(tmp_path):
    source, fresh = _net(0), _net(1)
    path = save_checkpoint(tmp_path / "ckpt.pt", source, epoch=3, metrics={"val_accuracy": 0.75})
    info = load_weights(path, fresh)
    _assert_same_weights(source, fresh)
    assert info["format"] == "kdistill"
    assert info["epoch"] == 3 and info["metrics"] == {"val_accuracy": 0.75}
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["tensors"] == 9


def test_kdistill_checkpoint_of_another_model_goes_through_signature_check(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", _net(0, width=8))
    model = _net(1, width=4)
    before = _snapshot(model)
    expected = r"holds weights of model 'Sequential'.*0\.weight: \[8, 3, 3, 3\] vs \[4, 3, 3, 3\]"
    with pytest.raises(CheckpointError, match=expected):
        load_weights(path, model)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model", "module", "net"])
def test_wrapped_state_dict(tmp_path, key):
    source, fresh = _net(0), _net(1)
    path = tmp_path / "wrapped.pt"
    torch.save({key: source.state_dict(), "epoch": 7, "optimizer": {"lr": 0.1}}, path)
    info = load_weights(path, fresh)
    _assert_same_weights(source, fresh)
    assert info["wrapper"] == key and info["stripped_prefix"] is None


def test_lightning_checkpoint(tmp_path):
    """Lightning nests the state_dict under "state_dict", keys prefixed by the attribute."""
    source, fresh = _net(0), _net(1)
    path = tmp_path / "epoch=3-step=100.ckpt"
    state = {f"model.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3, "global_step": 100, "optimizer_states": []}, path)
    info = load_weights(path, fresh)
    _assert_same_weights(source, fresh)
    assert info["wrapper"] == "state_dict" and info["stripped_prefix"] == "model."


def test_data_parallel_prefix_is_stripped(tmp_path):
    source, fresh = _net(0), _net(1)
    path = tmp_path / "ddp.pt"
    wrapped = nn.DataParallel(source)  # on the CPU it only wraps: keys get "module."
    assert all(k.startswith("module.") for k in wrapped.state_dict())
    torch.save(wrapped.state_dict(), path)
    info = load_weights(path, fresh)
    _assert_same_weights(source, fresh)
    assert info["stripped_prefix"] == "module."


def test_compiled_and_ddp_prefixes_are_stripped_together(tmp_path):
    source, fresh = _net(0), _net(1)
    path = tmp_path / "compiled.pt"
    torch.save({f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}, path)
    info = load_weights(path, fresh)
    _assert_same_weights(source, fresh)
    assert info["stripped_prefix"] == "module._orig_mod."


def test_prefix_the_model_really_has_is_kept(tmp_path):
    class Holder(nn.Module):
        def __init__(self, seed):
            super().__init__()
            self.module = _net(seed)

        def forward(self, x):
            return self.module(x)

    source, fresh = Holder(0), Holder(1)
    path = tmp_path / "holder.pt"
    torch.save(source.state_dict(), path)
    info = load_weights(path, fresh)
    _assert_same_weights(source, fresh)
    assert info["stripped_prefix"] is None


def test_prefixed_file_of_another_width_reports_stripped_keys(tmp_path):
    path = tmp_path / "ddp.pt"
    torch.save(nn.DataParallel(_net(0, width=8)).state_dict(), path)
    model = _net(1, width=4)
    before = _snapshot(model)
    with pytest.raises(CheckpointError) as e:
        load_weights(path, model)
    msg = str(e.value)
    assert "(compared without the prefix 'module.' that every key had)" in msg
    assert "0.weight: file (8, 3, 3, 3) vs model (4, 3, 3, 3)" in msg
    _assert_unchanged(model, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_safetensors_into_float32_model(tmp_path, dtype):
    source, fresh = _net(0), _net(1)
    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in source.state_dict().items()}
    path = tmp_path / "half.safetensors"
    save_file(half, str(path))
    info = load_weights(path, fresh)
    assert info["cast_from"] == str(dtype)
    for k, v in fresh.state_dict().items():
        assert v.dtype == source.state_dict()[k].dtype, k  # the model keeps its dtype
        assert torch.equal(v, half[k].to(v.dtype)), k
    assert not torch.equal(fresh[0].weight, source[0].weight)  # really rounded, not the fp32 source


def test_whole_pickled_module_is_refused_with_state_dict_hint(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(_net(0), path)
    model = _net(1)
    before = _snapshot(model)
    with pytest.raises(CheckpointError) as e:
        load_weights(path, model)
    msg = str(e.value)
    assert "torch.nn.modules.container.Sequential" in msg
    assert "torch.save(model.state_dict(), path)" in msg
    _assert_unchanged(model, before)


def test_missing_keys_are_named_and_nothing_is_loaded(tmp_path):
    state = _net(0).state_dict()
    del state["4.bias"], state["1.running_var"]
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    model = _net(1)
    before = _snapshot(model)
    with pytest.raises(CheckpointError) as e:
        load_weights(path, model)
    msg = str(e.value)
    assert "2 of the model's 9 keys are missing from the file (1.running_var, 4.bias)" in msg
    assert "another architecture" not in msg
    assert str(path) in msg and "Nothing was loaded" in msg
    _assert_unchanged(model, before)


def test_unexpected_keys_are_named_and_nothing_is_loaded(tmp_path):
    state = _net(0).state_dict()
    state["5.weight"] = torch.zeros(3)
    path = tmp_path / "extra.safetensors"
    save_file(state, str(path))
    model = _net(1)
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match=r"the file has 1 key the model does not have \(5\.weight\)"):
        load_weights(path, model)
    _assert_unchanged(model, before)


def test_shape_mismatch_names_shapes_and_nothing_is_loaded(tmp_path):
    path = tmp_path / "wide.pt"
    torch.save(_net(0, width=8).state_dict(), path)
    model = _net(1, width=4)
    before = _snapshot(model)
    with pytest.raises(CheckpointError) as e:
        load_weights(path, model)
    msg = str(e.value)
    assert "7 shapes differ (0.weight: file (8, 3, 3, 3) vs model (4, 3, 3, 3), 0.bias: file (8,) vs model (4,)" in msg
    assert "same class and constructor arguments" in msg
    assert "another architecture" not in msg  # 4.bias and the BatchNorm counter do fit
    _assert_unchanged(model, before)


def test_all_keys_wrong_suggests_another_architecture(tmp_path):
    path = tmp_path / "mlp.pt"
    torch.manual_seed(0)
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(108, 8), nn.ReLU(), nn.Linear(8, 5)).state_dict(), path)
    model = _net(1)
    before = _snapshot(model)
    with pytest.raises(CheckpointError) as e:
        load_weights(path, model)
    msg = str(e.value)
    assert "another architecture than Sequential" in msg
    assert "7 of the model's 9 keys are missing from the file (0.weight, 0.bias, 1.running_mean" in msg
    assert "the file has 2 keys the model does not have (3.weight, 3.bias)" in msg
    assert "1.weight: file (8, 108) vs model (4,)" in msg
    _assert_unchanged(model, before)


def test_missing_file(tmp_path):
    path = tmp_path / "teacher.pt"
    with pytest.raises(CheckpointError, match="does not exist") as e:
        load_weights(path, _net(0))
    assert str(path) in str(e.value) and "file of trained weights" in str(e.value)


def test_random_bytes_are_refused(tmp_path):
    path = tmp_path / "teacher.pt"
    path.write_bytes(random.Random(0).randbytes(300))
    model = _net(1)
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match=r"\(300 bytes\) is truncated or corrupt") as e:
        load_weights(path, model)
    assert "as a PyTorch file (UnpicklingError" in str(e.value)
    assert "nor as safetensors" in str(e.value)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("kind", ["pt", "safetensors"])
def test_truncated_file_is_refused(tmp_path, kind):
    path = tmp_path / f"teacher.{kind}"
    if kind == "pt":
        torch.save(_net(0).state_dict(), path)
    else:
        save_file(_net(0).state_dict(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    model = _net(1)
    before = _snapshot(model)
    with pytest.raises(CheckpointError, match=rf"\({len(data) // 2} bytes\) is truncated or corrupt") as e:
        load_weights(path, model)
    if kind == "pt":
        assert "PytorchStreamReader failed reading zip archive" in str(e.value)
    else:
        assert "as safetensors (SafetensorError" in str(e.value)
        assert "nor as a PyTorch file (UnpicklingError" in str(e.value)
    _assert_unchanged(model, before)


def test_content_that_is_not_a_state_dict(tmp_path):
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], listed)
    with pytest.raises(CheckpointError, match="holds a list, not a mapping of tensor name -> tensor"):
        load_weights(listed, _net(0))
    mixed = tmp_path / "mixed.pt"
    torch.save({"weights": [1, 2], "epoch": 3, "0.weight": torch.zeros(1)}, mixed)
    expected = r"2 of its 3 entries are not tensors \(first: 'weights' \(list\), 'epoch' \(int\)\)"
    with pytest.raises(CheckpointError, match=expected):
        load_weights(mixed, _net(0))


def test_read_checkpoint_points_to_load_weights(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save(_net(0).state_dict(), path)
    with pytest.raises(CheckpointError, match="load_weights"):
        read_checkpoint(path)
    with pytest.raises(CheckpointError, match="load_weights"):
        load_checkpoint(path, _net(0))
    assert load_weights(path, _net(1))["format"] == "state_dict"  # what the message suggests works
