"""Language-model runs (`data.text`): the same run directory, stages, resume, stage store and
report as image runs, on a tiny corpus and tiny random Llama-style models (seconds)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from kdistill.config import validate_config  # noqa: E402
from kdistill.errors import ConfigError  # noqa: E402
from kdistill.experiment import run_experiment  # noqa: E402


def _lm(width: int, layers: int) -> dict:
    return {"name": "causal_lm", "architecture": "llama", "hidden_size": width, "intermediate_size": 2 * width,
            "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 64}


def text_config(out, **stages) -> dict:
    raw = {
        "name": "tiny-text", "seed": 0, "output_dir": str(out), "threads": 1, "teacher_store": None,
        "data": {"text": {"corpus": "python_source", "max_bytes": 120_000, "vocab_size": 300, "block_size": 32,
                          "held_out": 0.1},
                 "batch_size": 8, "eval_batch_size": 16},
        "teacher": _lm(32, 2),
        "student": _lm(16, 1),
        "stages": {
            "teacher": {"epochs": 1, "optimizer": {"name": "adamw", "lr": 0.003}},
            "scratch": {"epochs": 1, "optimizer": {"name": "adamw", "lr": 0.003}},
            "distil": {"epochs": 1, "optimizer": {"name": "adamw", "lr": 0.003}, "alpha": 0.5, "temperature": 1.0,
                       "losses": [{"name": "forward_kl"}]},
        },
        "checkpoint": {"every_steps": 10, "every_seconds": None},
        "report": {"samples": 2, "new_tokens": 6, "repeats": 3},
    }
    raw["stages"].update(stages)
    return raw


def _run(raw, logs=None, **kw):
    return run_experiment(validate_config(raw), verbose=0, log=(logs.append if logs is not None else lambda m: None),
                          **kw)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("text") / "run"
    raw = text_config(out)
    return out, raw, _run(raw)


def test_a_text_run_measures_every_model_on_held_out_text(finished):
    out, _, m = finished
    assert m["task"] == "text" and m["stages"] == ["teacher", "scratch", "distil"]
    assert m["dataset"]["vocab_size"] == 300 and m["dataset"]["held_out_tokens"] > 0
    for name, row in m["models"].items():
        assert math.isclose(row["perplexity"], math.exp(row["held_out_loss"]), rel_tol=1e-9)
        assert row["perplexity"] < 300  # better than uniform over the vocabulary: every model learnt
        assert 0 < row["token_accuracy"] < 1 and row["generate_tokens_per_second"] > 0
        assert len(m["samples"][name]) == 2 and all(s["completion"] for s in m["samples"][name])
    assert m["models"]["teacher"]["parameters"] > m["models"]["distil"]["parameters"] == \
        m["models"]["scratch"]["parameters"]
    assert 0 <= m["models"]["distil"]["agreement_with_teacher"] <= 1
    ls, ld, lt = (m["models"][k]["held_out_loss"] for k in ("scratch", "distil", "teacher"))
    assert math.isclose(m["perplexity_gain"], math.exp(ls) - math.exp(ld), rel_tol=1e-9)
    if ls > lt:
        assert math.isclose(m["loss_gap_recovered"], (ls - ld) / (ls - lt), rel_tol=1e-9)
    for f in ("report.md", "report.html", "metrics.json", "config.yaml", "tokenizer/tokenizer.json"):
        assert (out / f).is_file(), f
    assert "perplexity" in (out / "report.md").read_text().lower()
    hist = m["histories"]["distil"]["history"]
    assert "distillation_loss" in hist and len(hist["val_loss"]) == 1


def test_a_finished_text_run_is_not_trained_again(finished):
    out, raw, m = finished
    logs: list[str] = []
    again = _run(raw, logs)
    assert any("already holds this finished run" in line for line in logs)
    assert again["models"]["distil"]["held_out_loss"] == m["models"]["distil"]["held_out_loss"]


def test_a_text_run_killed_mid_distillation_ends_as_an_uninterrupted_one(finished, tmp_path):
    out, raw, reference = finished
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    raw = {**raw, "output_dir": str(copy)}
    # as if killed in the distil stage: its last.pt stays (a mid-epoch state), done.json and the metrics are gone
    sdir = copy / "stages" / "distil"
    (sdir / "done.json").unlink()
    (copy / "metrics.json").unlink()
    state = torch.load(sdir / "last.pt", weights_only=True)
    assert state["global_step"] > 0
    run_json = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps({**run_json, "status": "running"}))
    logs: list[str] = []
    again = _run(raw, logs)
    assert any("[distil] resuming" in line for line in logs)
    assert not any("[teacher] training" in line or "[scratch] training" in line for line in logs)  # finished stages kept
    for k in ("teacher", "scratch", "distil"):
        assert again["models"][k]["held_out_loss"] == reference["models"][k]["held_out_loss"]


def test_teacher_and_student_vocabularies_must_agree_before_training(tmp_path):
    raw = text_config(tmp_path / "v")
    raw["student"] = {**raw["student"], "vocab_size": 320}  # a padded head: the tokenizer has 300
    with pytest.raises(ConfigError, match=r"320 entries and the teacher's 300.*vocab_size: 300"):
        _run(raw)
    assert not (tmp_path / "v" / "stages" / "teacher" / "done.json").exists()  # refused before any training


def test_a_padded_student_head_distils_with_vocab_size(tmp_path):
    raw = text_config(tmp_path / "p", distil={"epochs": 1, "alpha": 0.5, "temperature": 1.0, "vocab_size": 300,
                                               "losses": [{"name": "forward_kl"}]})
    raw["student"] = {**raw["student"], "vocab_size": 320}
    raw["stages"]["scratch"] = {"enabled": False}
    m = _run(raw)
    assert m["models"]["distil"]["perplexity"] < 320


def test_a_saved_teacher_is_used_as_it_is(tmp_path, finished):
    from kdistill.models.causal_lm import causal_lm

    saved = tmp_path / "teacher"
    causal_lm("llama", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64).save_pretrained(saved)
    raw = text_config(tmp_path / "s", teacher={"epochs": 0})
    raw["teacher"] = {"name": "causal_lm", "path": str(saved)}
    raw["stages"]["scratch"] = {"enabled": False}
    logs: list[str] = []
    m = _run(raw, logs)
    assert not any("[teacher] training" in line for line in logs)
    assert m["models"]["teacher"]["train_seconds"] == 0.0
    assert m["models"]["teacher"]["perplexity"] > 100  # random weights, used as they are


def test_a_missing_model_directory_is_refused_naming_it(tmp_path):
    raw = text_config(tmp_path / "m", teacher={"epochs": 0})
    raw["teacher"] = {"name": "causal_lm", "path": str(tmp_path / "nowhere")}
    with pytest.raises(FileNotFoundError, match="nowhere.*never downloads"):
        _run(raw)


def test_the_distilled_student_exports_as_a_hugging_face_directory(finished, tmp_path):
    from kdistill.cli import main
    from kdistill.experiment import load_stage_model
    from kdistill.models.causal_lm import load_causal_lm

    out, _, m = finished
    target = tmp_path / "student_hf"
    assert main(["export", str(out), "--format", "hf", "--out", str(target)]) == 0
    loaded = load_causal_lm(target)
    trained = load_stage_model(out, "distil")
    for a, b in zip(loaded.state_dict().values(), trained.state_dict().values()):
        assert torch.equal(a, b)
    assert (target / "tokenizer.json").is_file()
    record = json.loads((out / "export.json").read_text())["distil/hf"]
    assert record["parity"]["max_abs_diff"] == 0.0 and record["parity"]["argmax_agreement"] == 1.0
    # an image format is refused for a language model, and the reverse
    assert main(["export", str(out), "--format", "onnx"]) == 1


def test_kdistill_run_ends_with_the_perplexity_table(finished, capsys):
    from kdistill.cli.run import print_summary

    out, _, m = finished
    print_summary(m, out)
    printed = capsys.readouterr().out
    assert "| distilled |" in printed and "n/a" not in printed
    assert f"{m['models']['distil']['perplexity']:,.2f}" in printed
    assert f"{m['perplexity_gain']:+.2f}" in printed


def test_a_yaml_run_on_jsonl_records_with_a_saved_tokenizer_and_saved_models(tmp_path):
    """Distilling one saved causal LM into another from a YAML file: JSONL prompt/completion
    records, the models' tokenizer, both models loaded from directories."""
    from kdistill.data.text import train_tokenizer
    from kdistill.models.causal_lm import causal_lm

    records = [{"prompt": f"def f{i}(x):\n", "completion": f"    return x * {i} + {i % 7}\n"} for i in range(120)]
    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    tok = train_tokenizer([r["prompt"] + r["completion"] for r in records], vocab_size=300)
    shape = dict(intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    for name, width, layers in (("teacher", 32, 2), ("student", 16, 1)):
        causal_lm("llama", vocab_size=len(tok), hidden_size=width, num_hidden_layers=layers,
                  **shape).save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    raw = text_config(tmp_path / "run", teacher={"epochs": 1, "optimizer": {"name": "adamw", "lr": 0.01}},
                      scratch={"enabled": False})
    raw["data"]["text"] = {"jsonl": str(jsonl), "tokenizer": str(tmp_path / "teacher"), "block_size": 32,
                           "held_out": 0.1}
    raw["teacher"] = {"name": "causal_lm", "path": str(tmp_path / "teacher")}
    raw["student"] = {"name": "causal_lm", "path": str(tmp_path / "student")}
    m = _run(raw)
    assert m["dataset"]["train_sequences"] + m["dataset"]["held_out_sequences"] == 120
    # both learnt the completions (uniform over the 300 tokens would be perplexity 300)
    assert m["models"]["teacher"]["perplexity"] < 100 and m["models"]["distil"]["perplexity"] < 300
    assert m["models"]["teacher"]["train_seconds"] > 0  # the saved teacher was fine-tuned (epochs: 1)


def test_on_policy_distillation_from_yaml(tmp_path):
    """stages.distil.on_policy: the student generates the completions of every batch (lmbda 1)."""
    from kdistill.data.text import train_tokenizer

    records = [{"prompt": f"def f{i}(x):\n", "completion": f"    return x * {i}\n"} for i in range(40)]
    jsonl = tmp_path / "records.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    tok = train_tokenizer([r["prompt"] + r["completion"] for r in records], vocab_size=280)
    tok.save_pretrained(tmp_path / "tok")
    raw = text_config(tmp_path / "run", scratch={"enabled": False},
                      distil={"epochs": 1, "alpha": 0.0, "temperature": 1.0, "losses": [{"name": "generalized_jsd"}],
                              "on_policy": {"lmbda": 1.0, "max_new_tokens": 6, "seed": 3}})
    raw["data"]["text"] = {"jsonl": str(jsonl), "tokenizer": str(tmp_path / "tok"), "block_size": 32, "held_out": 0.1}
    m = _run(raw)
    hist = m["histories"]["distil"]["history"]
    assert hist["generate_seconds"][0] > 0  # every batch generated
    # an image run refuses it before anything runs
    from kdistill.config import validate_config
    from kdistill.errors import ConfigError as _CE

    img = {"name": "x", "data": {"dataset": "digits"}, "stages": {"distil": {"on_policy": {"lmbda": 0.5}}}}
    with pytest.raises((_CE, ValueError), match="on_policy .*needs data.text"):
        validate_config(img)
