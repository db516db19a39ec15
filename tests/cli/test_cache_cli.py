"""The teacher cache in experiments: ``stages.distil.teacher_cache`` in a config, and the
``kdistill cache build / info / verify`` commands, on a tiny digits experiment."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from experiment_configs import tiny_config, write_config
from kdistill.cli import main
from kdistill.config import validate_config
from kdistill.errors import ConfigError
from kdistill.experiment import distil_inputs, load_data, load_stage_model, run_experiment
from kdistill.teacher import TeacherCache

pytest.importorskip("sklearn")


def distilled_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_stage_model(run_dir, "distil").state_dict()


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    """The tiny experiment distilled from the live teacher (the reference)."""
    base = tmp_path_factory.mktemp("cache_runs")
    run_experiment(validate_config(tiny_config(base / "live")), verbose=0, log=lambda m: None)
    return base, base / "live"


# --------------------------------------------------------------------------- config
def test_config_section_defaults_and_refusals():
    on = validate_config(tiny_config("x", stages={**tiny_config("x")["stages"],
                                                 "distil": {"teacher_cache": True}}))
    tc = on.stages.distil.teacher_cache
    assert (tc.mode, tc.k, tc.dtype, tc.views, tc.path) == ("full", None, "float16", 0, None)
    assert validate_config(tiny_config("x")).stages.distil.teacher_cache is None

    def bad(distil_cache, augment=(), match=""):
        raw = tiny_config("x")
        raw["stages"]["distil"]["teacher_cache"] = distil_cache
        raw["data"]["augment"] = list(augment)
        with pytest.raises(ConfigError, match=match):
            validate_config(raw)

    bad({"mode": "topk"}, match="mode: topk needs k")
    bad({"k": 3}, match="k is only used with mode: topk")
    bad({}, augment=[{"name": "random_crop", "padding": 1}], match="needs teacher_cache.views >= 1")
    bad({"views": 2}, match="views needs data.augment")
    bad({"views": 2}, augment=[{"name": "mixup"}], match="mixup cannot make per-sample views")


# --------------------------------------------------------------------------- runner
def test_a_float32_cache_run_ends_on_the_live_runs_weights_and_reuses_its_cache(live_run):
    base, live = live_run
    raw = tiny_config(base / "cached")
    raw["stages"]["distil"]["teacher_cache"] = {"dtype": "float32"}
    logs: list[str] = []
    metrics = run_experiment(validate_config(raw), verbose=0, log=logs.append)
    assert any("building the teacher cache" in m and "40 bytes per sample" in m for m in logs)  # 10 float32
    assert any("distilling from the teacher cache" in m for m in logs)
    cache_dir = base / "cached" / "teacher_cache"  # no stage store: inside the run directory
    assert TeacherCache.open(cache_dir).describe()["dtype"] == "float32"
    # the cache holds exactly the live teacher's outputs: the student lands on the same weights
    for name, value in distilled_weights(live).items():
        assert torch.equal(value, distilled_weights(base / "cached")[name]), name
    live_metrics = json.loads((live / "metrics.json").read_text())
    assert metrics["models"]["distil"]["test_accuracy"] == live_metrics["models"]["distil"]["test_accuracy"]
    # a second run directory pointed at the same cache opens it instead of building
    raw2 = tiny_config(base / "cached2")
    raw2["stages"]["distil"]["teacher_cache"] = {"dtype": "float32", "path": str(cache_dir)}
    logs2: list[str] = []
    run_experiment(validate_config(raw2), verbose=0, log=logs2.append)
    assert not any("building the teacher cache" in m for m in logs2)
    assert any(f"distilling from the teacher cache {cache_dir}" in m for m in logs2)


def test_a_topk_cache_is_exact_at_the_stage_temperature_and_views_follow_data_augment(tmp_path):
    raw = tiny_config(tmp_path / "aug")
    raw["stages"]["teacher"]["epochs"] = 1
    raw["stages"]["scratch"]["enabled"] = False
    raw["data"]["augment"] = [{"name": "random_crop", "padding": 1}, {"name": "horizontal_flip"}]
    raw["stages"]["distil"]["teacher_cache"] = {"mode": "topk", "k": 3, "views": 2}
    logs: list[str] = []
    run_experiment(validate_config(raw), verbose=0, log=logs.append)
    cache = TeacherCache.open(tmp_path / "aug" / "teacher_cache")
    assert cache.views == 2 and cache.k == 3
    assert cache.tail_temperatures == [raw["stages"]["distil"]["temperature"]]  # the stage's T: exact there
    assert cache.augment_config["augmentations"][0] == {"_component_": "kdistill.data.augment.RandomCrop", "padding": 1}
    assert any("2 view(s)" in m for m in logs)


# --------------------------------------------------------------------------- the command
def test_cache_build_info_verify_and_use_from_a_run(live_run, capsys, tmp_path):
    base, live = live_run
    out = tmp_path / "c"
    # 1. a dry run prints the size and writes nothing
    assert main(["cache", "build", str(live), "--out", str(out), "--mode", "topk", "--k", "4", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    n = len(load_data(validate_config(tiny_config("x"))).x_train)
    assert f"{n:,} samples" in printed and "topk_values.npy" in printed and "total" in printed
    assert not out.exists()
    # 2. the build: what it stores is the run teacher's top-4 over the distil data
    assert main(["cache", "build", str(live), "--out", str(out), "--mode", "topk", "--k", "4", "--dtype", "float32"]) == 0
    assert f"stages.distil.teacher_cache.path={out}" in capsys.readouterr().out
    teacher = load_stage_model(live, "teacher")
    config = validate_config(tiny_config(live))
    x = distil_inputs(config, load_data(config))
    cache = TeacherCache.open(out, teacher=teacher, x=x)
    values = np.load(out / "topk_values.npy")
    with torch.no_grad():
        expected = teacher(x[:20]).topk(4, dim=-1).values
    assert np.allclose(values[:20], expected.numpy(), atol=1e-5)
    assert cache.tail_temperatures == [4.0]  # the distil stage's temperature by default
    # 3. info and verify
    assert main(["cache", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["mode"], info["k"], info["num_samples"]) == ("topk", 4, n)
    assert main(["cache", "verify", str(out)]) == 0
    assert "every file matches its checksum" in capsys.readouterr().out
    # 4. a run distils from it (no build) when the config points there with the same settings
    raw = tiny_config(tmp_path / "from_cli")
    raw["stages"]["distil"]["teacher_cache"] = {"mode": "topk", "k": 4, "dtype": "float32", "path": str(out)}
    logs: list[str] = []
    run_experiment(validate_config(raw), verbose=0, log=logs.append)
    assert any(f"distilling from the teacher cache {out}" in m for m in logs)
    assert not any("building" in m for m in logs)
    # 5. a damaged file: verify fails naming it; other settings at the same path are refused
    data = bytearray((out / "tail.npy").read_bytes())
    data[-1] ^= 0xFF
    (out / "tail.npy").write_bytes(bytes(data))
    assert main(["cache", "verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert "corrupt" in err and "tail.npy" in err
    assert main(["cache", "build", str(live), "--out", str(out), "--mode", "full"]) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_cache_build_refusals(live_run, capsys, tmp_path):
    base, live = live_run
    assert main(["cache", "build", str(live), "--out", str(tmp_path / "v"), "--views", "2"]) == 1
    assert "data.augment is empty" in capsys.readouterr().err
    config = write_config(tmp_path / "no_teacher.yaml", tiny_config(tmp_path / "r"))
    assert main(["cache", "build", str(config), "--out", str(tmp_path / "x")]) == 1
    assert "no teacher.checkpoint" in capsys.readouterr().err
    assert main(["cache", "info", str(tmp_path / "missing")]) == 1
    assert "no teacher cache at" in capsys.readouterr().err
