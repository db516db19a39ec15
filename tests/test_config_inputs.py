"""Config inputs as users write them: ML-style float literals (``1e-3``) in files and in
``--set`` overrides, and empty config files, which are refused instead of silently
running the default experiment."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from kdistill.config import ExperimentConfig, apply_overrides, dump_config, load_config, yaml_load
from kdistill.errors import ConfigError

EXAMPLE = "configs/fashion_mnist/kd/classic_cnn.yaml"


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- float literals


def test_exponent_floats_in_a_config_file_load_as_floats(tmp_path):
    path = write(tmp_path, (
        "stages:\n"
        "  teacher:\n"
        "    optimizer: {name: adam, lr: 1e-3}\n"
        "  distil:\n"
        "    temperature: 1e1\n"
        "    optimizer: {name: sgd, lr: 5E-2, weight_decay: 5e-4}\n"
    ))
    c = load_config(path)
    lr = c.stages.teacher.optimizer.kwargs["lr"]
    assert type(lr) is float and lr == 1e-3
    assert c.stages.distil.temperature == 10.0
    assert c.stages.distil.optimizer.kwargs == {"lr": 0.05, "weight_decay": 0.0005}
    assert type(c.stages.distil.optimizer.kwargs["weight_decay"]) is float


def test_exponent_float_in_a_set_override_loads_as_float(tmp_path):
    path = write(tmp_path, "stages:\n  distil:\n    optimizer: {name: adam, lr: 1e-3}\n")
    c = load_config(path, ["stages.distil.optimizer.lr=5e-4", "stages.distil.temperature=2e0"])
    lr = c.stages.distil.optimizer.kwargs["lr"]
    assert type(lr) is float and lr == 5e-4
    assert c.stages.distil.temperature == 2.0
    out = apply_overrides({}, ["stages.distil.optimizer.lr=1E5"])
    assert out["stages"]["distil"]["optimizer"]["lr"] == 1e5


@pytest.mark.parametrize("text, value", [
    ("1e-3", 1e-3), ("1E5", 1e5), ("-2.5e+4", -2.5e4), ("2.5e4", 2.5e4), ("+3e2", 300.0),
    (".5", 0.5), ("-.5", -0.5), ("5.", 5.0), ("1.0e5", 1e5), ("0.001", 0.001),
    (".inf", math.inf), ("-.inf", -math.inf),
])
def test_yaml_12_floats(text, value):
    out = yaml_load(f"x: {text}")["x"]
    assert type(out) is float and out == value


def test_pyyaml_itself_is_left_as_it_is():
    import yaml

    assert yaml.safe_load("x: 1e-3")["x"] == "1e-3"  # only kdistill's own loader reads 1.2 floats


def test_nan_stays_a_float():
    out = yaml_load("x: .nan")["x"]
    assert type(out) is float and math.isnan(out)


@pytest.mark.parametrize("text", ["1e-3abc", "e5", "1.2.3", "1e", "1e-", "0x1e3x", "inf", "nan", "08", "1_e5",
                                  "v1e3", "1e3.5"])
def test_strings_stay_strings(text):
    assert yaml_load(f"x: {text}")["x"] == text


@pytest.mark.parametrize("text, value", [("3", 3), ("0x10", 16), ("true", True), ("null", None), ("'1e-3'", "1e-3")])
def test_other_scalars_unchanged(text, value):
    out = yaml_load(f"x: {text}")["x"]
    assert out == value and type(out) is type(value)


def test_a_string_that_looks_like_a_float_survives_dump_and_load(tmp_path):
    # the saved config.yaml of a run is read back with load_config: a name "1e3"
    # must be written quoted, or it would come back as the float 1000.0
    c = ExperimentConfig(name="1e3")
    text = dump_config(c)
    assert "'1e3'" in text or '"1e3"' in text
    assert load_config(write(tmp_path, text)).name == "1e3"


# --------------------------------------------------------------------------- empty files


@pytest.mark.parametrize("text", ["", "\n\n", "# nothing but a comment\n# and another\n", "---\n", "   \n# x\n"],
                         ids=["empty", "blank-lines", "comments", "document-marker", "spaces-and-comment"])
def test_empty_config_file_is_refused(tmp_path, text):
    path = write(tmp_path, text, "empty.yaml")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "empty" in msg
    assert EXAMPLE in msg


def test_empty_config_file_is_refused_even_with_overrides(tmp_path):
    path = write(tmp_path, "# only a comment\n", "empty.yaml")
    with pytest.raises(ConfigError, match="empty"):
        load_config(path, ["stages.distil.epochs=3"])


def test_an_explicit_empty_mapping_still_means_every_default(tmp_path):
    # the way out the error message offers, for whoever wants the defaults on purpose
    assert load_config(write(tmp_path, "{}\n")) == ExperimentConfig()
