"""Born-again networks: the Python helper's chain of teachers, the YAML stage's
generations (stored, reported, resumed in the middle of generation 2), the refusals, and
the fingerprints of configs without the stage."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from crashing import Crash
from experiment_configs import tiny_config
from kdistill import born_again
from kdistill.config import validate_config
from kdistill.errors import ConfigError
from kdistill.experiment import run_experiment
from kdistill.run.fingerprints import config_fingerprint
from kdistill.teacher import EnsembleTeacher, LiveTeacher


def _net():
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4))


def _data(n=48):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_each_generation_learns_from_the_one_before():
    x, y = _data()
    torch.manual_seed(0)
    teacher = _net()
    gens = born_again(_net, teacher, x, y, generations=3, epochs=1, batch_size=16, verbose=0, seed=0)
    assert len(gens) == 3
    sources = [teacher] + [g.student for g in gens[:-1]]
    for g, source in zip(gens, sources):
        assert isinstance(g.teacher, LiveTeacher) and g.teacher.module is source
        assert g.history.history["loss"] and type(g.student) is type(teacher)
    assert len({id(g.student) for g in gens}) == 3


def test_ensemble_the_last_generation_distils_from_every_earlier_one():
    x, y = _data()
    teacher = _net()
    gens = born_again(_net, teacher, x, y, generations=3, ensemble=True, epochs=1, batch_size=16, verbose=0, seed=0)
    last = gens[-1].teacher
    assert isinstance(last, EnsembleTeacher) and last.combine == "mean_probs"
    assert [m.module for m in last.members] == [teacher, gens[0].student, gens[1].student]
    assert isinstance(gens[1].teacher, LiveTeacher)


def test_the_helper_refuses_bad_arguments():
    x, y = _data()
    with pytest.raises(ValueError, match="generations must be an integer >= 1, got 0"):
        born_again(_net, _net(), x, y, generations=0)
    with pytest.raises(TypeError, match="model_fn must be a function"):
        born_again(_net(), _net(), x, y)
    net = _net()
    with pytest.raises(ValueError, match="name or a factory"):
        born_again(_net, _net(), x, y, optimizer=torch.optim.Adam(net.parameters()))
    teacher = _net()
    with pytest.raises(ValueError, match="earlier generation"):
        born_again(lambda: teacher, teacher, x, y, epochs=1, verbose=0)


# --------------------------------------------------------------------------- YAML

pytest.importorskip("sklearn")  # the tiny runs below read scikit-learn's digits

BORN_AGAIN = {"generations": 3, "epochs": 2, "optimizer": {"name": "adam", "lr": 0.005}, "alpha": 0.3,
              "temperature": 4.0}


def _raw(out: Path, flag: Path | None = None, **born):
    raw = tiny_config(out, checkpoint={"every_steps": 1, "every_seconds": None})
    raw["stages"]["scratch"] = {"enabled": False}
    raw["stages"]["born_again"] = {**BORN_AGAIN, **born}
    raw["callbacks"] = [{"_component_": "crashing.CrashInStage", "n": 30, "stage": "{stage}",
                         "only": "born_again_2", "flag": str(flag or out.parent / "no.flag")}]
    return raw


def _quiet(raw, logs=None):
    return run_experiment(validate_config(raw), verbose=0, log=(logs.append if logs is not None else lambda s: None))


def test_generations_are_stages_of_the_teachers_architecture_in_the_report(tmp_path):
    out = tmp_path / "ba"
    logs: list[str] = []
    m = _quiet(_raw(out, ensemble=True), logs)
    assert m["stages"] == ["teacher", "distil", "born_again_1", "born_again_2", "born_again_3"]
    assert [line.split("]")[0] for line in logs if line.endswith("] training")] == [
        "[teacher", "[distil", "[born_again_1", "[born_again_2", "[born_again_3"]
    for k in (1, 2, 3):
        assert m["models"][f"born_again_{k}"]["parameters"] == m["models"]["teacher"]["parameters"]
        assert (out / "stages" / f"born_again_{k}" / "done.json").is_file()
        assert len(m["histories"][f"born_again_{k}"]["history"]["val_accuracy"]) == 2
    assert len({m["fingerprints"][f"born_again_{k}"] for k in (1, 2, 3)}) == 3
    report = (out / "report.md").read_text()
    assert all(f"born-again gen {k} vs the teacher (generation 0)" in report for k in (1, 2, 3))
    # the generations start from their own weights, and learned from their teachers
    assert m["agreement"]["born_again_1"] > 0.5
    from kdistill.experiment import load_stage_model

    gen2 = load_stage_model(out, "born_again_2")
    assert sum(p.numel() for p in gen2.parameters()) == m["models"]["teacher"]["parameters"]
    with pytest.raises(ValueError, match="born_again_1 to born_again_3"):
        load_stage_model(out, "born_again_4")


def test_a_longer_chain_shares_the_fingerprints_and_weights_of_its_first_generations(tmp_path):
    out = tmp_path / "ba"
    first = _quiet(_raw(out, generations=2))
    logs: list[str] = []
    longer = run_experiment(validate_config(_raw(out, generations=3)), force=True, verbose=0, log=logs.append)
    for k in (1, 2):
        assert longer["fingerprints"][f"born_again_{k}"] == first["fingerprints"][f"born_again_{k}"]
        assert longer["models"][f"born_again_{k}"]["test_accuracy"] == first["models"][f"born_again_{k}"]["test_accuracy"]


def test_resume_in_the_middle_of_generation_2_ends_bit_identical(tmp_path):
    reference = _quiet(_raw(tmp_path / "ref", ensemble=True))
    out, flag = tmp_path / "crash", tmp_path / "crash.flag"
    flag.write_text("")
    raw = _raw(out, flag, ensemble=True)
    with pytest.raises(Crash):
        _quiet(raw)
    assert (out / "stages" / "born_again_1" / "done.json").is_file()
    assert not (out / "stages" / "born_again_2" / "done.json").exists()
    assert torch.load(out / "stages" / "born_again_2" / "last.pt", weights_only=False)["global_step"] == 30
    logs: list[str] = []
    again = _quiet(raw, logs)
    assert any("[born_again_2] resuming" in line for line in logs)
    assert not any(line.startswith(("[teacher] training", "[born_again_1] training")) for line in logs)
    for k in (1, 2, 3):
        name = f"born_again_{k}"
        assert again["models"][name]["test_accuracy"] == reference["models"][name]["test_accuracy"]
        a = torch.load(tmp_path / "ref" / "stages" / name / "checkpoint.pt", weights_only=False)["state_dict"]
        b = torch.load(out / "stages" / name / "checkpoint.pt", weights_only=False)["state_dict"]
        assert all(torch.equal(a[key], b[key]) for key in a)
        assert again["histories"][name]["history"] == reference["histories"][name]["history"]


@pytest.mark.parametrize("born, message", [
    ({"generations": 0}, "generations"),
    ({"teacher_cache": True}, "born_again.teacher_cache is not supported"),
    ({"generations": 2, "ensembel": True}, "ensembel"),
])
def test_config_refusals(tmp_path, born, message):
    raw = tiny_config(tmp_path)
    raw["stages"]["born_again"] = {**BORN_AGAIN, **born}
    with pytest.raises(ConfigError, match=message):
        validate_config(raw)


def test_configs_without_the_new_stages_keep_their_fingerprint(tmp_path):
    raw = tiny_config(tmp_path)
    plain = config_fingerprint(validate_config(raw))
    raw["stages"]["born_again"] = None
    raw["stages"]["mutual"] = None
    assert config_fingerprint(validate_config(raw)) == plain
    raw["stages"]["born_again"] = BORN_AGAIN
    assert config_fingerprint(validate_config(raw)) != plain
