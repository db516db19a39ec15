"""`kdistill config show | schema | validate`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from experiment_configs import tiny_config, write_config
from kdistill.cli import main
from kdistill.config import config_dict, load_config, yaml_load

CONFIGS = sorted((Path(__file__).parents[2] / "configs").rglob("*.yaml"))


@pytest.fixture
def config(tmp_path):
    return write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path / "run"))


def test_show_prints_the_resolved_config_with_overrides(config, capsys):
    assert main(["config", "show", str(config), "--set", "stages.distil.temperature=7.5", "data.subset=100"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["stages"]["distil"]["temperature"] == 7.5 and shown["data"]["subset"] == 100
    # every default filled in, as a run directory's config.yaml has them
    assert shown["stages"]["distil"]["temperature_squared"] is True
    assert shown["checkpoint"]["every_seconds"] == 60.0
    assert shown == config_dict(load_config(config, ["stages.distil.temperature=7.5", "data.subset=100"]))


def test_show_output_is_a_config_that_loads_to_the_same(config, capsys, tmp_path):
    assert main(["config", "show", str(config)]) == 0
    again = tmp_path / "shown.yaml"
    again.write_text(capsys.readouterr().out)
    assert load_config(again) == load_config(config)


def test_schema_is_json_with_the_config_sections(capsys, tmp_path):
    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"stages", "data", "teacher", "student"} <= set(schema["properties"])
    out = tmp_path / "kdistill.schema.json"
    assert main(["config", "schema", "-o", str(out)]) == 0
    assert json.loads(out.read_text()) == schema
    assert "yaml-language-server: $schema=" in capsys.readouterr().out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[2])))
def test_schema_accepts_every_shipped_config(path, capsys):
    jsonschema = pytest.importorskip("jsonschema")
    main(["config", "schema"])
    schema = json.loads(capsys.readouterr().out)
    jsonschema.validate(yaml_load(path.read_text()), schema)  # short forms (teacher_cache: true, names) included


def test_schema_rejects_an_unknown_key(capsys):
    jsonschema = pytest.importorskip("jsonschema")
    main(["config", "schema"])
    schema = json.loads(capsys.readouterr().out)
    with pytest.raises(jsonschema.ValidationError, match="temprature"):
        jsonschema.validate({"stages": {"distil": {"temprature": 3}}}, schema)


def test_validate_ok(config, capsys):
    assert main(["config", "validate", str(config)]) == 0
    assert capsys.readouterr().out.strip() == "ok: tiny"


def test_validate_a_typo_says_did_you_mean_with_status_2(config, capsys):
    assert main(["config", "validate", str(config), "--set", "stages.distil.temprature=3"]) == 2
    captured = capsys.readouterr()
    assert "ok:" not in captured.out
    assert captured.err.startswith("kdistill config validate: error: ")
    assert "stages.distil.temprature: unknown key (did you mean temperature" in captured.err


def test_validate_a_component_that_does_not_import(config, tmp_path, capsys):
    raw = tiny_config(tmp_path / "run")
    raw["stages"]["distil"]["losses"] = [{"_component_": "no_such_package.Loss"}]
    assert main(["config", "validate", str(write_config(tmp_path / "bad.yaml", raw))]) == 2
    assert "cannot import module 'no_such_package'" in capsys.readouterr().err


def test_validate_builds_the_losses(config, capsys):
    # a value only the loss's constructor checks: found without running anything
    assert main(["config", "validate", str(config), "--set", "stages.distil.losses=[{name: kd, temperature: -1}]"]) == 2
    err = capsys.readouterr().err
    assert "stages.distil.losses: temperature must be a positive number, got -1" in err
