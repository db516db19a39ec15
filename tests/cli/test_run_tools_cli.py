"""`kdistill run / report / compare / export / bench / sweep` on a tiny digits experiment."""

from __future__ import annotations

import json

import pytest

from experiment_configs import tiny_config, write_config
from kdistill.cli import main

pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    base = tmp_path_factory.mktemp("tools")
    raw = tiny_config(base / "run")
    raw["stages"]["teacher"]["epochs"] = 2
    config = write_config(base / "tiny.yaml", raw)
    assert main(["run", str(config), "--quiet"]) == 0
    return base, config, base / "run"


def test_run_prints_the_table_and_saves_the_resolved_config(run, capsys):
    base, config, run_dir = run
    import yaml

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["stages"]["distil"]["temperature_squared"] is True  # defaults filled in
    assert saved["checkpoint"]["every_seconds"] == 60.0


def test_run_with_overrides_into_another_directory(run, capsys):
    base, config, _ = run
    out = base / "override"
    assert main(["run", str(config), "--out", str(out), "--quiet", "--set", "stages.distil.alpha=0.8",
                 "stages.scratch.enabled=false"]) == 0
    printed = capsys.readouterr().out
    assert "| distilled |" in printed and "| scratch |" not in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["stages"]["distil"]["alpha"] == 0.8 and set(metrics["models"]) == {"teacher", "distil"}


def test_bad_config_fails_before_anything_is_written(run, capsys, tmp_path):
    _, config, _ = run
    assert main(["run", str(config), "--out", str(tmp_path / "x"), "--set", "stages.distil.temprature=3"]) == 1
    err = capsys.readouterr().err
    assert "stages.distil.temprature: unknown key (did you mean temperature" in err
    assert not (tmp_path / "x").exists()


def test_report_rewrites_both_files(run, capsys):
    _, _, run_dir = run
    (run_dir / "report.html").unlink()
    assert main(["report", str(run_dir)]) == 0
    html = (run_dir / "report.html").read_text()
    assert "<table" in html and "data:image/png;base64," in html


def test_report_of_an_unfinished_run_says_how_to_finish(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("name: x\n")
    assert main(["report", str(tmp_path)]) == 1
    assert "kdistill run --resume" in capsys.readouterr().err


def test_compare_puts_runs_in_one_table(run, capsys, tmp_path):
    base, config, run_dir = run
    other = tmp_path / "other"
    assert main(["run", str(config), "--out", str(other), "--quiet", "--set", "stages.distil.temperature=1.5"]) == 0
    capsys.readouterr()
    out = tmp_path / "cmp.md"
    assert main(["compare", str(run_dir), str(other), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.with_suffix(".json").read_text())
    assert [r["run"] for r in rows] == [str(run_dir), str(other)] and str(other) in printed
    assert [r["temperature"] for r in rows] == [4.0, 1.5]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert rows[0]["distilled_accuracy"] == metrics["models"]["distil"]["test_accuracy"]
    assert out.read_text() == printed.split("\n\nwritten:")[0] + "\n"


@pytest.mark.parametrize("fmt, suffix", [("onnx", ".onnx"), ("torchscript", ".pt")])
def test_export_checks_parity_and_reports_int8(run, capsys, fmt, suffix):
    pytest.importorskip("onnxruntime")
    _, _, run_dir = run
    assert main(["export", str(run_dir), "--format", fmt, "--int8"]) == 0
    printed = capsys.readouterr().out
    assert f"student{suffix}" in printed and "max |exported - PyTorch|" in printed and "int8:" in printed
    result = json.loads((run_dir / "export.json").read_text())[f"distil/{fmt}"]
    assert result["parity"]["max_abs_diff"] <= 1e-4
    assert result["test_accuracy_exported"] == pytest.approx(result["test_accuracy_pytorch"], abs=1e-3)
    assert abs(result["int8"]["accuracy_change_points"]) < 15
    assert (run_dir / f"student{suffix}").is_file() and (run_dir / f"student.int8{suffix}").is_file()


def test_export_to_torch_export_pt2_and_bench_it(run, capsys):
    _, _, run_dir = run
    assert main(["export", str(run_dir), "--format", "pt2"]) == 0
    result = json.loads((run_dir / "export.json").read_text())["distil/pt2"]
    assert (run_dir / "student.pt2").is_file() and result["parity"]["max_abs_diff"] <= 1e-4
    assert result["test_accuracy_exported"] == pytest.approx(result["test_accuracy_pytorch"], abs=1e-3)
    capsys.readouterr()
    assert main(["export", str(run_dir), "--format", "pt2", "--int8"]) == 1
    assert "export --format onnx --int8" in capsys.readouterr().err
    assert main(["bench", str(run_dir), "--repeats", "2"]) == 0
    assert "student.pt2" in capsys.readouterr().out


def test_export_fails_when_parity_is_broken(run, capsys):
    pytest.importorskip("onnxruntime")
    _, _, run_dir = run
    # onnxruntime and PyTorch round differently (~1e-7): a zero tolerance is a parity failure
    code = main(["export", str(run_dir), "--format", "onnx", "--atol", "0"])
    err = capsys.readouterr().err
    if code == 0:
        pytest.skip("this machine's onnxruntime reproduced PyTorch bit for bit")
    assert code == 1 and "differs from the PyTorch model" in err and "tolerance 0" in err


def test_export_of_an_unfinished_stage_is_refused(run, capsys, tmp_path):
    _, config, _ = run
    import shutil

    _, _, run_dir = run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "stages" / "distil" / "done.json").unlink()
    assert main(["export", str(copy)]) == 1
    assert "has not finished" in capsys.readouterr().err


def test_bench_a_run_a_file_and_a_model_name(run, capsys, tmp_path):
    _, _, run_dir = run
    out = tmp_path / "bench.json"
    assert main(["bench", str(run_dir), "--repeats", "3", "--throughput-batch", "16", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert {"teacher/pytorch", "scratch/pytorch", "distil/pytorch"} <= set(results)
    for r in results.values():
        assert r["latency_ms"] > 0 and r["throughput"] > 0 and r["size_bytes"] > 0
    capsys.readouterr()
    assert main(["bench", "classic_student", "--repeats", "3", "--throughput-batch", "8"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["results"]["classic_student"]["parameters"] > 0
    assert main(["bench", "no_such_thing"]) == 1
    assert "not a run directory" in capsys.readouterr().err


def test_sweep_runs_the_grid_reusing_the_teacher(run, capsys, tmp_path):
    _, config, _ = run
    out = tmp_path / "sweep"
    assert main(["sweep", str(config), "--grid", "alpha=0.1,0.9", "temperature=2,8", "--out", str(out), "--quiet",
                 "--set", "stages.distil.epochs=1", "teacher_store=null"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("[teacher] training") == 1 and printed.count("[teacher] reusing") == 3
    assert printed.count("[scratch] training") == 1
    rows = json.loads((out / "sweep.json").read_text())
    assert sorted((r["params"]["alpha"], r["params"]["temperature"]) for r in rows) == [(0.1, 2), (0.1, 8), (0.9, 2), (0.9, 8)]
    assert len({r["distilled_accuracy"] for r in rows}) > 1  # the settings changed the result
    assert len({r["teacher_accuracy"] for r in rows}) == 1
    for key in ("alpha", "temperature"):
        assert (out / f"sweep_{key}.png").read_bytes()[:4] == b"\x89PNG"
    assert "| alpha=0.9,temperature=8 |" in (out / "sweep.md").read_text() or "alpha=0.9,temperature=8" in (out / "sweep.md").read_text()


def test_sweep_grid_errors(run, capsys, tmp_path):
    _, config, _ = run
    assert main(["sweep", str(config), "--grid", "alpha", "--out", str(tmp_path / "s")]) == 1
    assert "key=v1,v2" in capsys.readouterr().err
    assert main(["sweep", str(config), "--grid", "alpha=0.1,7", "--out", str(tmp_path / "s")]) == 1
    assert "stages.distil.alpha" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
