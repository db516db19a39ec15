"""Checkpoints: round trip, atomic writes, and refusing files that do not fit."""

from __future__ import annotations

import os

import pytest
import torch

from kdistill.atomic import atomic_write_text
from kdistill.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from kdistill.errors import CheckpointError
from kdistill.models import build_model


def _trained_student(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("classic_student", input_size=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model, opt


def test_round_trip_weights_optimizer_and_metadata(tmp_path):
    model, opt = _trained_student(0)
    path = save_checkpoint(tmp_path / "sub" / "ckpt.pt", model, optimizer=opt, epoch=4,
                           metrics={"val_loss": 0.25}, extra={"note": "x"})
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]  # no temp file left

    other, other_opt = _trained_student(1)
    assert not torch.equal(other[0].weight, model[0].weight)
    meta = load_checkpoint(path, other, optimizer=other_opt)
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k
    sa, sb = opt.state_dict(), other_opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        assert int(sa["state"][i]["step"]) == int(sb["state"][i]["step"]) == 2
        assert torch.equal(sa["state"][i]["exp_avg"], sb["state"][i]["exp_avg"])
        assert torch.equal(sa["state"][i]["exp_avg_sq"], sb["state"][i]["exp_avg_sq"])
    assert meta["epoch"] == 4
    assert meta["metrics"] == {"val_loss": 0.25}
    assert meta["extra"] == {"note": "x"}
    assert meta["model_name"] == "classic_student"


def test_truncated_file_is_refused(tmp_path):
    model, opt = _trained_student()
    path = save_checkpoint(tmp_path / "ckpt.pt", model, optimizer=opt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_checkpoint(path, build_model("classic_student", input_size=8))
    assert str(path) in str(e.value)


def test_garbage_file_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(path)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    teacher = build_model("classic_teacher")
    student = build_model("classic_student")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    path = save_checkpoint(tmp_path / "teacher.pt", teacher)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, student)
    msg = str(e.value)
    assert "classic_teacher" in msg and "classic_student" in msg
    assert "0.weight: [256, 1, 3, 3] vs [16, 1, 3, 3]" in msg
    for k, v in student.state_dict().items():
        assert torch.equal(v, before[k])  # nothing was loaded


def test_checkpoint_with_missing_keys_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "mlp.pt", build_model("mlp", hidden=(4,)))
    with pytest.raises(CheckpointError, match=r"holds weights of model 'mlp'.*'classic_student'.*missing"):
        load_checkpoint(path, build_model("classic_student"))


def test_plain_state_dict_is_refused_with_advice(tmp_path):
    model = build_model("classic_student")
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="not a kdistill checkpoint") as e:
        load_checkpoint(path, model)
    assert "load_state_dict" in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt", build_model("classic_student"))


def test_atomic_write_keeps_old_file_when_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    model, _ = _trained_student(0)
    save_checkpoint(path, model, epoch=1)
    old = path.read_bytes()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, _trained_student(1)[0], epoch=2)
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "log.csv", "a,b\n")
    monkeypatch.undo()
    assert path.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    assert read_checkpoint(path)["epoch"] == 1


def test_atomic_write_text(tmp_path):
    p = atomic_write_text(tmp_path / "a" / "b.txt", "héllo\n")
    assert p.read_text(encoding="utf-8") == "héllo\n"
    atomic_write_text(p, "second\n")
    assert p.read_text() == "second\n"
    assert [x.name for x in p.parent.iterdir()] == ["b.txt"]


# ------------------------------------------------------------------ safetensors weights


def test_save_weights_round_trips_through_load_weights(tmp_path):
    from safetensors import safe_open

    from kdistill.checkpoint import load_weights, save_weights

    model, _ = _trained_student(0)
    path = save_weights(tmp_path / "sub" / "student.safetensors", model, metadata={"stage": "distil"})
    assert path == tmp_path / "sub" / "student.safetensors"
    assert [p.name for p in path.parent.iterdir()] == ["student.safetensors"]  # no temp file left
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt" and meta["model_name"] == "classic_student" and meta["stage"] == "distil"

    other, _ = _trained_student(1)
    info = load_weights(path, other)
    assert info["format"] == "safetensors" and info["tensors"] == len(model.state_dict())
    for (k, a), (_, b) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), k


def test_save_weights_stores_tied_weights_once_and_loads_them_back(tmp_path):
    from kdistill.checkpoint import load_weights, save_weights

    def tied():
        m = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5, bias=False))
        m[1].weight = m[0].weight
        return m

    torch.manual_seed(0)
    model = tied()
    save_weights(tmp_path / "tied.safetensors", model)
    other = tied()
    load_weights(tmp_path / "tied.safetensors", other)
    assert torch.equal(other[0].weight, model[0].weight) and other[1].weight is other[0].weight


def test_load_weights_refuses_saved_weights_of_another_model(tmp_path):
    from kdistill.checkpoint import load_weights, save_weights

    model, _ = _trained_student(0)
    path = save_weights(tmp_path / "student.safetensors", model)
    wrong = build_model("classic_teacher", input_size=8)
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"do not fit model 'classic_teacher'.*Nothing was loaded"):
        load_weights(path, wrong)
    assert all(torch.equal(before[k], v) for k, v in wrong.state_dict().items())  # unchanged


def test_save_weights_replaces_a_file_atomically_and_checks_its_input(tmp_path, monkeypatch):
    import safetensors.torch

    from kdistill.checkpoint import load_weights, save_weights

    model, _ = _trained_student(0)
    path = save_weights(tmp_path / "w.safetensors", model)
    old = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", crash)
    with pytest.raises(OSError, match="disk full"):
        save_weights(path, _trained_student(1)[0])
    assert path.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
    monkeypatch.undo()
    load_weights(path, _trained_student(2)[0])
    with pytest.raises(TypeError, match="must be a torch.nn.Module"):
        save_weights(tmp_path / "x.safetensors", {"w": torch.zeros(1)})
    with pytest.raises(TypeError, match="metadata maps strings to strings"):
        save_weights(tmp_path / "x.safetensors", model, metadata={"epoch": 3})
