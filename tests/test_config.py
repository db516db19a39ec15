"""Experiment configs: the shipped YAML files, the dump/validate round trip, ``--set``
overrides, and one test per kind of error (each must name the file, the key path and
what was expected)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kdistill.cli.classic import shipped_config
from kdistill.config import (
    ExperimentConfig,
    apply_overrides,
    builtin_losses,
    check_kwargs,
    config_dict,
    dump_config,
    load_config,
    resolve_callable,
    validate_config,
)
from kdistill.errors import ConfigError
from kdistill.losses import KDLoss

ROOT = Path(__file__).resolve().parents[1]
CLASSIC = ROOT / "configs" / "fashion_mnist" / "kd" / "classic_cnn.yaml"
DIGITS = ROOT / "configs" / "digits" / "kd" / "mlp_mlp.yaml"


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(raw, source: str = "my_exp.yaml") -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(raw, source=source)
    return str(info.value)


def distil_losses(*losses) -> dict:
    return {"stages": {"distil": {"losses": list(losses)}}}


# --------------------------------------------------------------------------- shipped configs


def test_classic_config_has_the_keras_example_settings():
    c = load_config(CLASSIC)
    assert isinstance(c, ExperimentConfig)
    assert c.name == "fashion_mnist-kd-classic_cnn"
    assert c.data.dataset == "fashion_mnist"
    assert c.data.batch_size == 64
    assert c.data.subset is None and c.data.unlabelled is False
    assert c.teacher.name == "classic_teacher" and c.student.name == "classic_student"
    assert c.stages.teacher.epochs == 2
    assert c.stages.teacher.temperature == 1.0
    assert c.stages.scratch.epochs == 5
    assert c.stages.distil.epochs == 5
    assert c.stages.distil.alpha == 0.1
    assert c.stages.distil.temperature == 10.0
    assert c.stages.distil.teacher_cache is not None and c.stages.distil.teacher_cache.mode == "full"
    for stage in (c.stages.teacher, c.stages.scratch, c.stages.distil):
        assert stage.optimizer.name == "adam"
        assert stage.optimizer.kwargs == {"lr": 0.001}
    [loss] = c.stages.distil.losses
    assert loss.name == "kd" and loss.weight == 1.0 and loss.resolve() is KDLoss
    assert c.checkpoint.every_seconds == 60
    assert c.run_dir() == Path("runs/fashion_mnist/kd/classic_cnn")


def test_classic_config_is_shipped_as_package_data():
    path = shipped_config()
    assert path.is_file()
    assert load_config(path) == load_config(CLASSIC)


def test_digits_config_values():
    c = load_config(shipped_config("configs/digits/kd/mlp_mlp.yaml"))
    assert c == load_config(DIGITS)
    assert c.data.dataset == "digits"
    assert c.data.subset == 150 and c.data.unlabelled is True
    assert c.data.batch_size == 32
    assert c.teacher.name == "mlp" and c.teacher.kwargs == {"hidden": [256, 256]}
    assert c.student.name == "mlp" and c.student.kwargs == {"hidden": [16]}
    assert (c.stages.teacher.epochs, c.stages.scratch.epochs, c.stages.distil.epochs) == (15, 10, 10)
    assert c.stages.teacher.optimizer.kwargs == {"lr": 0.002}
    assert c.stages.distil.optimizer.kwargs == {"lr": 0.003}
    assert c.stages.distil.alpha == 0.3
    assert c.stages.distil.temperature == 4.0
    assert [l.name for l in c.stages.distil.losses] == ["kd"]
    assert c.stages.distil.losses[0].weight == 1.0  # the default
    assert c.checkpoint.every_seconds == 30


def test_an_explicit_empty_mapping_gives_the_defaults(tmp_path):
    c = load_config(write(tmp_path, "{}  # every default, on purpose\n"))
    assert c == ExperimentConfig()
    assert c.stages.distil.losses[0].name == "kd"


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("path", [CLASSIC, DIGITS], ids=["classic", "digits"])
def test_dump_validate_round_trip_of_shipped_configs(path):
    c = load_config(path)
    text = dump_config(c)
    again = validate_config(yaml.safe_load(text), source="dumped.yaml")
    assert again == c
    assert dump_config(again) == text


def test_round_trip_with_user_components_and_every_section(tmp_path):
    c = load_config(CLASSIC, [
        "data.subset=100",
        "data.unlabelled=true",
        "data.augment=[{name: random_crop, padding: 2}, {name: horizontal_flip, p: 0.25}]", "stages.distil.teacher_cache=null",
        "student={_component_: user_components.tiny_mlp, width: 4}",
        "stages.distil.losses=[{name: kd, temperature: 3.0}, "
        "{_component_: user_components.CosineLogits, scale: 2.0, weight: 0.5}]",
        "stages.distil.schedule={_component_: torch.optim.lr_scheduler.StepLR, step_size: 2, interval: step}",
        "stages.scratch.schedule={name: cosine, warmup_epochs: 1}",
        "callbacks=[{name: early_stopping}, {_component_: user_components.SlowDown, seconds: 0.0}]",
    ])
    dumped = yaml.safe_load(dump_config(c))
    # components come back in their YAML form: _component_ and kwargs, weight kept
    assert dumped["student"] == {"_component_": "user_components.tiny_mlp", "checkpoint": None, "width": 4}
    assert dumped["stages"]["distil"]["losses"][1] == {
        "_component_": "user_components.CosineLogits", "weight": 0.5, "scale": 2.0}
    assert dumped["stages"]["distil"]["schedule"]["interval"] == "step"
    path = write(tmp_path, dump_config(c), "resolved.yaml")
    again = load_config(path)
    assert again == c
    assert config_dict(again) == config_dict(c)
    assert again.stages.distil.losses[1].kwargs == {"scale": 2.0}
    assert again.stages.distil.losses[1].weight == 0.5


# --------------------------------------------------------------------------- overrides


def test_overrides_parse_values_as_yaml():
    raw = yaml.safe_load(CLASSIC.read_text())
    out = apply_overrides(raw, [
        "seed=3",
        "stages.distil.alpha=0.5",
        "stages.scratch.enabled=false",
        "data.data_dir=null",
        "output_dir=",
        "data.augment=[{name: horizontal_flip, p: 0.3}]",
        "teacher.hidden=[1, 2]",
        "stages.distil.losses.0.weight=0.25",
    ])
    assert out["seed"] == 3 and type(out["seed"]) is int
    assert out["stages"]["distil"]["alpha"] == 0.5 and type(out["stages"]["distil"]["alpha"]) is float
    assert out["stages"]["scratch"]["enabled"] is False
    assert out["data"]["data_dir"] is None
    assert out["output_dir"] is None
    assert out["data"]["augment"] == [{"name": "horizontal_flip", "p": 0.3}]
    assert out["teacher"]["hidden"] == [1, 2]
    assert out["stages"]["distil"]["losses"] == [{"name": "kd", "weight": 0.25}]
    # the input is not modified
    assert raw["seed"] == 0
    assert raw["stages"]["distil"]["losses"] == [{"name": "kd", "weight": 1.0}]


def test_override_creates_missing_sections():
    out = apply_overrides({}, ["stages.distil.temperature=2", "data.subset=10"])
    assert out == {"stages": {"distil": {"temperature": 2}}, "data": {"subset": 10}}
    c = validate_config(out)
    assert c.stages.distil.temperature == 2.0 and c.data.subset == 10


def test_overrides_through_load_config():
    c = load_config(CLASSIC, [
        "stages.distil.temperature=4", "stages.distil.losses.0.weight=0.5", "data.batch_size=128",
        "stages.scratch.enabled=false", "threads=null", "data.subset=500", "data.unlabelled=true",
    ])
    assert c.stages.distil.temperature == 4.0
    assert c.stages.distil.losses[0].weight == 0.5
    assert c.data.batch_size == 128
    assert c.stages.scratch.enabled is False
    assert c.threads is None
    assert c.data.subset == 500 and c.data.unlabelled is True
    # untouched values are the file's
    assert c.stages.distil.alpha == 0.1


def test_override_with_a_new_key_fails_as_unknown():
    with pytest.raises(ConfigError) as info:
        load_config(CLASSIC, ["stages.distil.alpah=0.3"])
    msg = str(info.value)
    assert "classic_cnn.yaml" in msg
    assert "--set stages.distil.alpah=0.3" in msg
    assert "stages.distil.alpah" in msg
    assert "unknown key" in msg and "did you mean alpha" in msg


def test_override_value_of_the_wrong_type_fails_at_validation():
    with pytest.raises(ConfigError, match=r"stages\.distil\.epochs.*valid integer.*'x'"):
        load_config(CLASSIC, ["stages.distil.epochs=x"])


@pytest.mark.parametrize("override", ["seed", "=3", "", "stages.distil.alpha"])
def test_malformed_override(override):
    with pytest.raises(ConfigError, match=r"must look like key\.path=value"):
        apply_overrides({}, [override])
    with pytest.raises(ConfigError, match=r"must look like key\.path=value"):
        load_config(CLASSIC, [override])


@pytest.mark.parametrize("override, message", [
    ("seed.x=1", r"'seed' is 0, not a section"),
    ("stages.distil.losses.3.weight=1", r"'stages\.distil\.losses\.3' is not an index of a list of 1 items"),
    ("stages.distil.losses.w.weight=1", r"'stages\.distil\.losses\.w' is not an index"),
    ("stages.distil.losses.0.weight.x=1", r"'stages\.distil\.losses\.0\.weight' is 1\.0, not a section"),
])
def test_override_through_a_value_or_a_bad_index(override, message):
    raw = yaml.safe_load(CLASSIC.read_text())
    with pytest.raises(ConfigError, match=message):
        apply_overrides(raw, [override])


# --------------------------------------------------------------------------- errors: keys, types, ranges


def test_unknown_key_names_file_path_and_suggestion(tmp_path):
    path = write(tmp_path, "stages:\n  distil:\n    alpah: 0.3\n", "typo.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "typo.yaml" in msg
    assert "stages.distil.alpah" in msg
    assert "did you mean alpha" in msg
    # lists what the section does take
    assert "temperature" in msg and "losses" in msg


def test_unknown_top_level_key_suggests_the_section():
    msg = config_error({"stage": {}})
    assert "my_exp.yaml" in msg and "stage: unknown key" in msg and "did you mean stages" in msg


def test_every_problem_is_listed():
    msg = config_error({"seed": -1, "data": {"batch_size": 0}, "stages": {"distil": {"alpah": 1}}})
    assert "3 problem(s)" in msg
    for where in ("seed", "data.batch_size", "stages.distil.alpah"):
        assert where in msg


@pytest.mark.parametrize("raw, where, expected", [
    ({"stages": {"distil": {"alpha": "abc"}}}, "stages.distil.alpha", "valid number"),
    ({"data": {"batch_size": 1.5}}, "data.batch_size", "valid integer"),
    ({"stages": {"scratch": {"enabled": "maybe"}}}, "stages.scratch.enabled", "valid boolean"),
    ({"data": 3}, "data", "valid dictionary"),
    ({"stages": {"distil": {"losses": "kd"}}}, "stages.distil.losses", "valid list"),
])
def test_wrong_type(raw, where, expected):
    msg = config_error(raw)
    assert "my_exp.yaml" in msg
    assert f"{where}:" in msg
    assert expected in msg


@pytest.mark.parametrize("raw, where, expected", [
    ({"stages": {"distil": {"alpha": 1.5}}}, "stages.distil.alpha", "less than or equal to 1 (got 1.5)"),
    ({"stages": {"distil": {"alpha": -0.1}}}, "stages.distil.alpha", "greater than or equal to 0"),
    ({"stages": {"distil": {"temperature": 0}}}, "stages.distil.temperature", "greater than 0 (got 0)"),
    ({"stages": {"teacher": {"temperature": -1}}}, "stages.teacher.temperature", "greater than 0"),
    ({"stages": {"teacher": {"epochs": -1}}}, "stages.teacher.epochs", "greater than or equal to 0 (got -1)"),
    ({"stages": {"distil": {"epochs": 0}}}, "stages.distil.epochs", "greater than or equal to 1"),
    ({"stages": {"distil": {"losses": []}}}, "stages.distil.losses", "at least 1"),
    ({"stages": {"distil": {"losses": [{"name": "kd", "weight": -1}]}}}, "stages.distil.losses.0.weight",
     "greater than or equal to 0"),
    ({"stages": {"distil": {"optimizer": {"name": "adam", "lr": 0}}}}, "stages.distil.optimizer", "lr must be a number > 0"),
])
def test_out_of_range(raw, where, expected):
    msg = config_error(raw)
    assert f"{where}:" in msg
    assert expected in msg


def test_unlabelled_needs_subset():
    msg = config_error({"data": {"unlabelled": True}})
    assert "data:" in msg and "data.unlabelled needs data.subset" in msg
    assert validate_config({"data": {"unlabelled": True, "subset": 10}}).data.unlabelled is True


def test_teacher_epochs_default_to_zero_with_a_checkpoint_and_zero_needs_one():
    assert validate_config({}).stages.teacher.epochs == 1
    assert validate_config({"teacher": {"name": "classic_teacher", "checkpoint": "t.pt"}}).stages.teacher.epochs == 0
    tuned = validate_config({"teacher": {"name": "classic_teacher", "checkpoint": "t.pt"}, "stages": {"teacher": {"epochs": 2}}})
    assert tuned.stages.teacher.epochs == 2
    msg = config_error({"stages": {"teacher": {"epochs": 0}}})
    assert "stages.teacher.epochs is 0 (use the teacher as it is), but no teacher.checkpoint is given" in msg
    assert ".safetensors" in msg


def test_assistant_stage_is_validated():
    c = validate_config({"stages": {"assistant": {"model": {"name": "classic_student", "width": 4}, "temperature": 2}}})
    assert c.stages.assistant.model.kwargs == {"width": 4} and c.stages.assistant.temperature == 2
    assert "stages.assistant.model" in config_error({"stages": {"assistant": {"epochs": 1}}})
    msg = config_error({"stages": {"assistant": {"model": {"name": "classic_student", "checkpoint": "a.pt"}}}})
    assert "stages.assistant.model.checkpoint is not supported" in msg
    msg = config_error({"data": {"augment": [{"name": "horizontal_flip"}]},
                        "stages": {"assistant": {"model": {"name": "classic_student"}, "teacher_cache": True}}})
    assert "stages.assistant.teacher_cache with data.augment needs teacher_cache.views" in msg


def test_student_checkpoint_rejected():
    msg = config_error({"student": {"name": "classic_student", "checkpoint": "w.pt"}})
    assert "student.checkpoint is not supported" in msg


def test_unknown_dataset_rejected():
    msg = config_error({"data": {"dataset": "not_a_dataset"}})
    assert "data.dataset" in msg


# --------------------------------------------------------------------------- errors: components


def test_component_module_that_does_not_import():
    msg = config_error(distil_losses({"_component_": "no_such_package_kd.losses.MyLoss"}))
    assert "stages.distil.losses.0" in msg
    assert "cannot import module 'no_such_package_kd.losses'" in msg
    assert "no_such_package_kd.losses.MyLoss" in msg


def test_component_attribute_missing():
    msg = config_error(distil_losses({"_component_": "user_components.CosineLogit"}))
    assert "stages.distil.losses.0" in msg
    assert "module 'user_components' has no attribute 'CosineLogit'" in msg
    assert "did you mean CosineLogits" in msg


def test_component_that_is_not_callable():
    msg = config_error({"student": {"_component_": "user_components.time"}})
    assert "student:" in msg and "not a class or function" in msg


def test_component_without_a_dot():
    msg = config_error({"student": {"_component_": "tiny_mlp"}})
    assert "student:" in msg and "dotted path" in msg


def test_component_kwarg_the_class_does_not_take():
    msg = config_error(distil_losses({"_component_": "user_components.CosineLogits", "scal": 2.0}))
    assert "stages.distil.losses.0" in msg
    assert "CosineLogits takes no argument 'scal'" in msg
    assert "did you mean scale" in msg
    assert "it takes: scale" in msg


def test_model_kwarg_the_builder_does_not_take():
    msg = config_error({"student": {"_component_": "user_components.tiny_mlp", "depth": 3}})
    assert "student:" in msg
    assert "tiny_mlp takes no argument 'depth'" in msg
    assert msg.rstrip().endswith("it takes: width")  # num_classes, in_channels, input_size come from the data


def test_builtin_model_kwarg_the_builder_does_not_take():
    msg = config_error({"teacher": {"name": "mlp", "hiden": [8]}})
    assert "teacher:" in msg and "takes no argument 'hiden'" in msg and "did you mean hidden" in msg


@pytest.mark.parametrize("key", ["num_classes", "in_channels", "input_size"])
def test_model_kwarg_the_runner_sets_itself(key):
    msg = config_error({"student": {"name": "mlp", key: 3}})
    assert "student:" in msg
    assert f"'{key}' is set by kdistill itself" in msg


def test_unknown_builtin_loss_name_suggests():
    msg = config_error(distil_losses({"name": "kdd"}))
    assert "stages.distil.losses.0" in msg
    assert "unknown loss 'kdd'" in msg
    assert "did you mean kd" in msg
    assert "KDLoss" in msg  # lists the known names


def test_unknown_builtin_model_and_optimizer_names_suggest():
    assert "did you mean classic_student" in config_error({"student": {"name": "clasic_student"}})
    msg = config_error({"stages": {"teacher": {"optimizer": {"name": "adamm"}}}})
    assert "stages.teacher.optimizer" in msg and "unknown optimizer 'adamm'" in msg and "did you mean adam" in msg
    msg = config_error({"stages": {"teacher": {"optimizer": {"name": "adam", "lrr": 0.1}}}})
    assert "takes no argument 'lrr'" in msg and "did you mean lr" in msg


def test_unknown_schedule_and_augmentation():
    msg = config_error({"stages": {"distil": {"schedule": {"name": "cosin"}}}})
    assert "stages.distil.schedule" in msg and "did you mean cosine" in msg
    msg = config_error({"stages": {"distil": {"schedule": {"name": "step", "milestones": [1]}}}})
    assert "schedule 'step' takes no ['milestones']" in msg
    msg = config_error({"data": {"augment": [{"name": "random_crop", "pad": 4}]}})
    assert "data.augment.0" in msg and "takes no argument 'pad'" in msg and "did you mean padding" in msg


def test_component_needs_exactly_one_of_name_and_path():
    assert "exactly one of 'name'" in config_error({"student": {"width": 3}})
    assert "exactly one of 'name'" in config_error(
        {"student": {"name": "mlp", "_component_": "user_components.tiny_mlp"}})


def test_builtin_losses_maps_short_and_class_names_to_the_same_class():
    table = builtin_losses()
    assert table["kd"] == table["KDLoss"]
    assert resolve_callable(table["kd"]) is KDLoss
    assert resolve_callable(table["KDLoss"]) is KDLoss
    # only DistillationLoss classes buildable from keyword arguments
    assert "kd_loss" not in table and "DistillationLoss" not in table and "WeightedSum" not in table
    # both spellings validate to the same class
    for name in ("kd", "KDLoss"):
        [spec] = validate_config(distil_losses({"name": name})).stages.distil.losses
        assert spec.resolve() is KDLoss


def test_user_component_loss_and_model_validate():
    import user_components

    c = validate_config({
        "teacher": {"_component_": "user_components.tiny_mlp", "width": 32},
        "student": {"_component_": "user_components.tiny_mlp", "width": 4},
        "stages": {"distil": {"losses": [
            {"name": "kd", "weight": 1.0},
            {"_component_": "user_components.CosineLogits", "weight": 0.5, "scale": 2.0},
        ]}},
    })
    assert c.student.resolve() is user_components.tiny_mlp
    assert c.student.kwargs == {"width": 4}
    assert c.teacher.kwargs == {"width": 32}
    kd, cos = c.stages.distil.losses
    assert cos.resolve() is user_components.CosineLogits
    assert cos.kwargs == {"scale": 2.0} and cos.weight == 0.5
    assert cos.label() == "CosineLogits"
    assert kd.kwargs == {} and kd.label() == "kd"


def test_user_model_kwarg_the_runner_sets_itself():
    msg = config_error({"student": {"_component_": "user_components.tiny_mlp", "num_classes": 3}})
    assert "'num_classes' is set by kdistill itself" in msg


def test_component_given_as_a_plain_string():
    c = validate_config({"student": "classic_student", "stages": {"distil": {"losses": ["kd"]}}})
    assert c.student.name == "classic_student"
    assert c.stages.distil.losses[0].name == "kd" and c.stages.distil.losses[0].weight == 1.0


def test_loss_component_that_is_not_a_distillation_loss_fails_at_load():
    config_error(distil_losses({"_component_": "user_components.not_a_loss"}))


def test_check_kwargs_directly():
    def fn(a, b=1, *, c=2):
        return a

    check_kwargs(fn, {"b": 1, "c": 3})
    with pytest.raises(ValueError, match=r"takes no argument 'd'; it takes: a, b, c"):
        check_kwargs(fn, {"d": 1})
    with pytest.raises(ValueError, match=r"'a' is set by kdistill itself"):
        check_kwargs(fn, {"a": 1}, provided=("a",))
    check_kwargs(lambda **kw: None, {"anything": 1})  # **kwargs takes everything


# --------------------------------------------------------------------------- errors: files


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert f"no config file at {path}" in msg
    assert "configs/" in msg  # says where the shipped ones are


def test_invalid_yaml(tmp_path):
    path = write(tmp_path, "stages:\n  distil: {alpha: 0.1\n", "broken.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "broken.yaml" in msg and "not valid YAML" in msg


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("42\n", "int"), ("just a string\n", "str")])
def test_top_level_not_a_mapping(tmp_path, text, kind):
    path = write(tmp_path, text, "list.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert "list.yaml" in msg and "mapping of sections" in msg and f"got {kind}" in msg
    with pytest.raises(ConfigError, match=f"in.yaml: an experiment config is a mapping.*got {kind}"):
        validate_config(yaml.safe_load(text), source="in.yaml")


@pytest.mark.parametrize("text", ["[]\n", "false\n", "0\n"], ids=["list", "false", "zero"])
def test_falsy_top_level_is_not_a_mapping_either(tmp_path, text):
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_config(write(tmp_path, text, "falsy.yaml"))


def test_config_error_is_a_value_error():
    # callers that catch ValueError (bad input) also catch config errors
    assert issubclass(ConfigError, ValueError)
