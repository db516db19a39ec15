"""The training step in YAML: ``precision``, ``accumulate_steps`` and ``max_grad_norm`` of
every stage, validated, passed to the trainers, part of the stage's fingerprint; one table
of optimizers and one of schedules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from experiment_configs import tiny_config
from kdistill.checkpoint import read_training_state
from kdistill.config import SCHEDULES, OptimizerSpec, ScheduleSpec, validate_config
from kdistill.distiller import OPTIMIZERS
from kdistill.errors import ConfigError
from kdistill.experiment import build_optimizer, build_schedule, run_experiment
from kdistill.run.fingerprints import config_fingerprint, stage_settings


def _stages(tmp_path, **distil):
    stages = tiny_config(tmp_path)["stages"]
    return {**stages, "distil": {**stages["distil"], **distil}}


def test_every_stage_takes_the_training_step_settings(tmp_path):
    raw = tiny_config(tmp_path)
    for stage in ("teacher", "scratch", "distil"):
        raw["stages"][stage].update(precision="bf16", accumulate_steps=2, max_grad_norm=1.0)
    raw["stages"]["assistant"] = {"model": {"name": "mlp", "hidden": [16]}, "accumulate_steps": 3}
    config = validate_config(raw)
    assert config.stages.teacher.precision == "bf16" and config.stages.distil.max_grad_norm == 1.0
    assert config.stages.assistant.accumulate_steps == 3 and config.stages.assistant.precision == "fp32"


@pytest.mark.parametrize("key, value, message", [
    ("precision", "fp8", "precision"),
    ("accumulate_steps", 0, "accumulate_steps"),
    ("max_grad_norm", 0, "max_grad_norm"),
    ("max_grad_norm", -1.0, "max_grad_norm"),
    ("max_grad_norm", float("inf"), "max_grad_norm"),
])
def test_bad_training_step_settings_are_refused_naming_the_key(tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=f"stages.distil.{message}"):
        validate_config(tiny_config(tmp_path, stages=_stages(tmp_path, **{key: value})))


def test_fingerprints_keep_their_value_at_the_defaults_and_change_with_a_setting(tmp_path):
    plain = validate_config(tiny_config(tmp_path))
    explicit = validate_config(tiny_config(tmp_path, stages=_stages(
        tmp_path, precision="fp32", accumulate_steps=1, max_grad_norm=None)))
    assert config_fingerprint(plain) == config_fingerprint(explicit)
    assert "accumulate_steps" not in stage_settings(plain.stages.distil)
    for change in ({"precision": "bf16"}, {"accumulate_steps": 2}, {"max_grad_norm": 1.0}, {"ema_decay": 0.9}):
        other = validate_config(tiny_config(tmp_path, stages=_stages(tmp_path, **change)))
        assert config_fingerprint(other) != config_fingerprint(plain), change
        assert stage_settings(other.stages.distil) != stage_settings(plain.stages.distil), change


def test_fp16_on_the_cpu_is_found_before_training(tmp_path):
    raw = tiny_config(tmp_path / "run", device="cpu", stages=_stages(tmp_path, precision="fp16"))
    with pytest.raises(ConfigError, match=r"stages.distil.precision: precision='fp16' needs a CUDA device.*bf16"):
        run_experiment(validate_config(raw), verbose=0, log=lambda m: None)
    assert not (tmp_path / "run" / "stages" / "teacher" / "checkpoint.pt").exists()


def test_a_run_trains_its_stages_with_the_settings(tmp_path):
    stages = _stages(tmp_path, precision="bf16", accumulate_steps=2, max_grad_norm=1.0,
                     schedule={"name": "cosine"})
    stages["teacher"] = {**stages["teacher"], "epochs": 1}
    raw = tiny_config(tmp_path / "run", device="cpu", stages=stages)
    metrics = run_experiment(validate_config(raw), verbose=0, log=lambda m: None)
    history = metrics["histories"]["distil"]["history"]
    assert "grad_norm" in history and "grad_norm" not in metrics["histories"]["teacher"]["history"]
    loss = history["loss"]
    assert len(loss) == 2 and loss[1] < loss[0]
    # the distil stage stepped the optimizer once per two batches, the scratch one (same data
    # and batch size) once per batch; two epochs each
    distil = read_training_state(tmp_path / "run" / "stages" / "distil" / "last.pt")
    scratch = read_training_state(tmp_path / "run" / "stages" / "scratch" / "last.pt")
    assert distil["accumulate_steps"] == 2 and distil["precision"] == "bf16"
    batches = scratch["global_step"] // 2
    assert distil["global_step"] == 2 * -(-batches // 2)


def test_a_stage_with_ema_decay_ends_with_the_average_of_its_weights(tmp_path):
    import torch as _torch

    from kdistill.experiment import load_stage_model

    stages = _stages(tmp_path, ema_decay=0.5)
    raw = tiny_config(tmp_path / "run", device="cpu", stages=stages)
    run_experiment(validate_config(raw), verbose=0, log=lambda m: None)
    state = read_training_state(tmp_path / "run" / "stages" / "distil" / "last.pt")
    averaged = state["callbacks"]["EMA"]["averaged"]  # the average, saved with the training state
    assert int(averaged["n_averaged"]) == state["global_step"]
    final = load_stage_model(tmp_path / "run", "distil")
    raw_weights = state["modules"]["model"]
    for k, v in final.state_dict().items():
        assert _torch.equal(v, averaged[f"module.{k}"]), k  # the stage's checkpoint is the average
    assert any(not _torch.equal(v, raw_weights[k]) for k, v in final.state_dict().items())
    assert "EMA" not in read_training_state(tmp_path / "run" / "stages" / "scratch" / "last.pt")["callbacks"]


# ------------------------------------------------------------------ one table each
def test_named_optimizers_resolve_through_the_engines_table():
    params = [nn.Parameter(torch.zeros(2))]
    for name, (cls, lr) in OPTIMIZERS.items():
        spec = OptimizerSpec(name=name)
        assert spec.resolve() is cls
        opt = build_optimizer(spec, params)
        assert isinstance(opt, cls) and opt.param_groups[0]["lr"] == lr  # the default compile(name) gives
    assert build_optimizer(OptimizerSpec(name="sgd", lr=0.3), params).param_groups[0]["lr"] == 0.3
    with pytest.raises(ValueError, match="unknown optimizer 'adamx'"):
        OptimizerSpec(name="adamx")


def test_schedule_keywords_and_defaults_come_from_one_table():
    with pytest.raises(ValueError, match=r"schedule 'step' takes no \['milestones'\]"):
        ScheduleSpec(name="step", milestones=[1])
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    factory, interval = build_schedule(ScheduleSpec(name="step"), epochs=5, steps_per_epoch=3)
    sched = factory(opt)
    assert interval == "epoch"
    assert sched.step_size == SCHEDULES["step"]["step_size"] and sched.gamma == SCHEDULES["step"]["gamma"]
    factory, _ = build_schedule(ScheduleSpec(name="multistep"), epochs=10, steps_per_epoch=3)
    assert list(factory(opt).milestones) == [5]
