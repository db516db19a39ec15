"""The report of a language-model run: Markdown and HTML pages, figures, compare, warnings."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
from test_html import PNG_MAGIC, _data_uris, example_metrics  # image runs: test_html checks their reports

from kdistill.cli import main
from kdistill.report import compare_runs, compare_table, plot_sweep, write_report
from kdistill.report.text import (
    headlines,
    render_text_html,
    render_text_markdown,
    text_headline_numbers,
    verdict,
)
from kdistill.run.measure import training_warnings


def _lm(width: int, layers: int) -> dict:
    return {"name": "causal_lm", "checkpoint": None, "architecture": "llama", "hidden_size": width,
            "intermediate_size": 2 * width, "num_hidden_layers": layers, "num_attention_heads": layers * 2,
            "num_key_value_heads": 2, "max_position_embeddings": 64}


def _model(loss: float, accuracy: float, parameters: int, speed: float, seconds: float,
           agreement: float | None = None) -> dict:
    m = {"held_out_loss": loss, "perplexity": math.exp(loss), "token_accuracy": accuracy, "parameters": parameters,
         "size_bytes": 4 * parameters + 8000, "generate_tokens_per_second": speed, "train_seconds": seconds,
         "reused": False}
    if agreement is not None:
        m["agreement_with_teacher"] = agreement
    return m


def _history(loss: list[float], val_loss: list[float], distil: bool = False) -> dict:
    history = {"loss": loss, "accuracy": [0.1] * len(loss), "val_loss": val_loss, "val_accuracy": [0.16] * len(loss)}
    if distil:
        history.update(student_loss=[v + 1 for v in loss], distillation_loss=[0.5] * len(loss),
                       val_student_loss=val_loss)
    return {"epoch": list(range(len(loss))), "history": history}


def text_metrics() -> dict:
    """A language-model run's ``metrics.json``, shaped as ``kdistill run`` writes it."""
    models = {
        "teacher": _model(3.6079580783843994, 0.1774193548387097, 37_792, 1467.24, 3.79),
        "scratch": _model(3.9428958892822266, 0.16129032258064516, 12_208, 1891.88, 0.98, 0.5161290322580645),
        "distil": _model(3.871199131011963, 0.16129032258064516, 12_208, 874.32, 1.63, 0.45161290322580644),
    }
    gain, recovered = text_headline_numbers(models)
    return {
        "task": "text",
        "kdistill_version": "0.1.0",
        "name": "tiny-text",
        "config": {
            "name": "tiny-text",
            "data": {"text": {"corpus": "python_source", "vocab_size": 300, "block_size": 32}, "batch_size": 8},
            "teacher": _lm(32, 2),
            "student": _lm(16, 1),
            "stages": {
                "teacher": {"epochs": 2},
                "scratch": {"epochs": 2, "enabled": True},
                "distil": {"epochs": 2, "alpha": 0.5, "label_loss_weight": None, "temperature": 2.0,
                           "temperature_squared": True, "losses": [{"name": "kd", "weight": 1.0}]},
            },
            "report": {"repeats": 3, "samples": 2, "prompt_tokens": 24, "new_tokens": 8},
        },
        "dataset": {"name": "python_source",
                    "source": "the Python standard library's own .py sources on this machine (PSF License Version 2)",
                    "train_sequences": 2079, "labelled": 2079, "held_out_sequences": 2, "train_tokens": 66528,
                    "held_out_tokens": 64, "block_size": 32, "vocab_size": 300},
        "stages": ["teacher", "scratch", "distil"],
        "models": models,
        "perplexity_gain": gain,
        "loss_gap_recovered": recovered,
        "samples": {
            stage: [{"prompt": "initialized = True\n\ndef main():", "completion": f"\n        {c} {c} {c} "},
                    {"prompt": 'Hello world!")\n\nif __name__', "completion": f"{c} {c} {c} {c}"}]
            for stage, c in (("teacher", "n"), ("scratch", "s"), ("distil", "d"))
        },
        "histories": {"teacher": _history([4.4, 4.1], [3.9, 3.61]), "scratch": _history([4.8, 4.5], [4.2, 3.94]),
                      "distil": _history([2.8, 2.5], [4.1, 3.87], distil=True)},
        "fingerprints": {"teacher": "t0", "scratch": "s0", "distil": "d0"},
        "machine": {"platform": "Linux-6.1-x86_64", "processor": "x86_64", "cpu_count": 2, "torch_threads": 1,
                    "torch": "2.13.0+cpu", "python": "3.11.7", "cuda": None},
        "timing": {"wall_seconds": 16.6, "stages": {"teacher": 3.82, "scratch": 0.99, "distil": 1.64,
                                                   "measure": 0.15}},
        "warnings": [],
    }


def _worse_distilled(metrics: dict) -> dict:
    """The same run with a distilled student worse than the scratch one (held-out loss 4.0)."""
    m = copy.deepcopy(metrics)
    m["models"]["distil"].update(held_out_loss=4.0, perplexity=math.exp(4.0))
    m["perplexity_gain"], m["loss_gap_recovered"] = text_headline_numbers(m["models"])
    return m


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("text-run")
    return run_dir, write_report(run_dir, text_metrics())


# -- the numbers ------------------------------------------------------------------------


def test_text_headline_numbers_follow_their_definitions():
    models = text_metrics()["models"]
    gain, recovered = text_headline_numbers(models)
    assert gain == pytest.approx(math.exp(3.9428958892822266) - math.exp(3.871199131011963))  # 3.5678
    ls, ld, lt = 3.9428958892822266, 3.871199131011963, 3.6079580783843994
    assert recovered == pytest.approx((ls - ld) / (ls - lt)) and recovered == pytest.approx(0.2140599118328112)
    no_scratch = {k: v for k, v in models.items() if k != "scratch"}
    assert text_headline_numbers(no_scratch) == (None, None)
    weak_teacher = copy.deepcopy(models)
    weak_teacher["teacher"]["held_out_loss"] = 4.0  # no lower than the scratch student's: no gap
    assert text_headline_numbers(weak_teacher)[1] is None


# -- write_report -----------------------------------------------------------------------


def test_write_report_dispatches_text_runs(written):
    run_dir, paths = written
    assert sorted(paths) == ["curves", "html", "loss", "markdown"]
    for key in ("loss", "curves"):
        assert paths[key] == run_dir / "figures" / f"{key}.png" and paths[key].read_bytes()[:8] == PNG_MAGIC
    page = paths["html"].read_text(encoding="utf-8")
    assert [data[:8] for data in _data_uris(page)] == [PNG_MAGIC, PNG_MAGIC]
    assert 'src="http' not in page and "Content-Security-Policy" in page
    assert list(run_dir.rglob("*.tmp")) == []
    md = paths["markdown"].read_text(encoding="utf-8")
    assert "](figures/loss.png)" in md and "](figures/curves.png)" in md


def test_report_shows_the_headline_formatted(written):
    _, paths = written
    page, md = paths["html"].read_text(encoding="utf-8"), paths["markdown"].read_text(encoding="utf-8")
    for text in (page, md):
        for number in ("48.00", "51.57", "36.89", "+3.57", "21.4%"):  # distilled, scratch, teacher, gain, recovered
            assert number in text, number
    assert '<div class="value good">+3.57</div>' in page and '<div class="value good">21.4%</div>' in page
    assert "- **+3.57** perplexity gain of distillation (scratch minus distilled)" in md
    assert "- **21.4%** of the teacher-scratch gap in held-out loss recovered" in md
    assert "did not help" not in page and "did not help" not in md


def test_report_shows_the_setup_table_and_machine(written):
    _, paths = written
    page, md = paths["html"].read_text(encoding="utf-8"), paths["markdown"].read_text(encoding="utf-8")
    table = page[page.index('<table class="comparison" id="comparison"'):page.index("</table>")]
    assert re.findall(r"<tr class=\"(\w+)\"", table) == ["teacher", "scratch", "distilled"]
    assert ("<td>distilled</td><td>3.8712</td><td>48.00</td><td>16.13%</td><td>45.16%</td><td>12,208</td>"
            "<td>55.5 KiB</td><td>874</td><td>2 s</td>") in table
    assert "<td>teacher</td><td>3.6080</td><td>36.89</td><td>17.74%</td><td>-</td><td>37,792</td>" in table
    assert "| scratch | 3.9429 | 51.57 | 16.13% | 51.61% | 12,208 | 55.5 KiB | 1,892 | 1 s |" in md
    for text in ("<code>python_source</code>", "PSF License Version 2", "66,528 training tokens in 2,079 sequences",
                 "64 held-out tokens", "blocks of 32 tokens", "a vocabulary of 300 tokens", "<code>causal_lm</code>",
                 "llama, hidden size 32, 2 layers, 4 attention heads", "hidden size 16, 1 layer, 2 attention heads",
                 "loss kd, alpha 0.5, temperature 2", "torch 2.13.0+cpu", "batch 1, on the CPU",
                 "Wall time 16.6 s: teacher 3.8 s, scratch 1.0 s, distilled 1.6 s"):
        assert text in page, text
    assert "Corpus `python_source`: the Python standard library" in md and "`causal_lm` (llama" in md
    assert "Held-out next-token loss per epoch" in page  # the figure's caption


def test_samples_are_shown_as_written_and_escaped():
    m = text_metrics()
    m["samples"]["distil"][0]["completion"] = '<script>alert("x")</script>\n```\nmore'
    page = render_text_html(m, {})
    assert page.count("<script>") == 1  # only the page's own load handler
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page
    # each prompt once, every model's completion of it, in <pre> (a leading newline kept)
    assert page.count("initialized = True") == 1
    assert '<pre class="completion" style="margin: 0; white-space: pre-wrap;">\n\n        n n n </pre>' in page
    md = render_text_markdown(m, {})
    assert "````text\n<script>alert(\"x\")</script>\n```\nmore\n````" in md  # a fence no backticks in it close
    assert md.count("<script>") == 1 and "```text\n\n        s s s \n```" in md


def test_text_run_without_scratch_says_why_there_is_no_gain():
    m = text_metrics()
    m["stages"].remove("scratch")
    del m["models"]["scratch"], m["histories"]["scratch"], m["samples"]["scratch"]
    m["perplexity_gain"], m["loss_gap_recovered"] = text_headline_numbers(m["models"])
    assert m["perplexity_gain"] is None
    page = render_text_html(m, {})
    assert "perplexity gain: no scratch student in this run" in page and "<td>scratch</td>" not in page
    assert verdict(m) is None


# -- distillation that did not help -----------------------------------------------------


def test_negative_gain_is_reported_as_such():
    m = _worse_distilled(text_metrics())
    assert m["perplexity_gain"] == pytest.approx(51.5677 - 54.5982, abs=1e-3)
    ls, lt = 3.9428958892822266, 3.6079580783843994
    assert m["loss_gap_recovered"] == pytest.approx((ls - 4.0) / (ls - lt))  # -0.170
    cards = headlines(m)
    assert ("-3.03", "perplexity gain of distillation (scratch minus distilled)", "bad") in cards
    assert ("-17.0%", "of the teacher-scratch gap in held-out loss recovered", "bad") in cards
    page, md = render_text_html(m, {}), render_text_markdown(m, {})
    assert '<div class="value bad">-3.03</div>' in page
    said = "Distillation did not help in this run: the distilled student&#39;s held-out perplexity (54.60) is higher"
    assert said in page and "that of the same student trained from scratch (51.57), a gain of -3.03" in page
    assert "**No gain here:** Distillation did not help in this run" in md and "- **-3.03** perplexity gain" in md
    assert training_warnings(m) == []  # worse than scratch is not a failed training


# -- warnings ---------------------------------------------------------------------------


def test_training_warnings_of_text_runs():
    m = text_metrics()
    assert training_warnings(m) == []
    m["models"]["scratch"]["perplexity"] = 300.0  # = the vocabulary: no better than a uniform guess
    m["models"]["teacher"]["perplexity"] = math.inf
    (teacher, scratch) = training_warnings(m)
    assert scratch.startswith("scratch's held-out perplexity is 300.0, no better than a uniform guess over the 300 "
                              "tokens of the vocabulary: its training failed; check stages.scratch.optimizer")
    assert teacher.startswith("teacher's held-out perplexity is inf, no better than a uniform guess")
    m["models"]["teacher"]["perplexity"] = math.nan
    assert "perplexity is nan, not a finite number" in training_warnings(m)[0]
    m["models"]["scratch"]["perplexity"] = 299.0
    m["histories"]["distil"]["history"]["loss"] = [2.0, 30.0]  # a diverged stage is told as for image runs
    assert [w.split(" ")[:2] for w in training_warnings(m)] == [["teacher's", "held-out"], ["the", "distilled"]]


def test_warnings_appear_in_the_report():
    m = text_metrics()
    m["warnings"] = ["scratch's held-out perplexity is 300.0, <no better>"]
    assert "<strong>Warning:</strong> scratch&#39;s held-out perplexity is 300.0, &lt;no better&gt;." in \
        render_text_html(m, {})
    assert "**Warning:** scratch's held-out perplexity is 300.0, &lt;no better&gt;." in render_text_markdown(m, {})


# -- several runs -----------------------------------------------------------------------


def test_compare_two_text_runs():
    worse = _worse_distilled(text_metrics())
    worse["config"]["stages"]["distil"]["losses"] = [{"name": "reverse_kl", "weight": 1.0}]
    rows = compare_runs([("kd", text_metrics()), ("rkl", worse)])
    assert [r["task"] for r in rows] == ["text", "text"]
    assert rows[0]["distilled_perplexity"] == pytest.approx(47.99990976508027)
    assert rows[0]["recovered"] == pytest.approx(0.2140599118328112)
    lines = compare_table(rows).splitlines()
    assert lines[0] == ("| run | method | alpha | temperature | teacher perplexity | scratch perplexity | distilled "
                        "perplexity | perplexity gain | loss gap recovered | student parameters | distilled generation "
                        "(tokens/s) |")
    assert len(lines) == 4 and lines[1].count("---|") == 11
    assert lines[2] == "| kd | kd | 0.5 | 2 | 36.89 | 51.57 | 48.00 | +3.57 | 21.4% | 12,208 | 874 |"
    assert lines[3] == "| rkl | reverse_kl | 0.5 | 2 | 36.89 | 51.57 | 54.60 | -3.03 | -17.0% | 12,208 | 874 |"


def test_compare_puts_image_and_text_runs_in_separate_tables():
    table = compare_table(compare_runs([("image", example_metrics()), ("text", text_metrics())]))
    image, text = table.split("\n\nLanguage-model runs (held-out perplexity, lower is better):\n\n")
    assert image.startswith("Image classification runs (test accuracy):\n\n| run | method | alpha | temperature "
                            "| teacher | scratch |")
    assert "| image | kd | 0.1 | 10 | 87.34% |" in image and "| text |" not in image
    assert text.splitlines()[2].startswith("| text | kd | 0.5 | 2 | 36.89 |") and len(text.splitlines()) == 3


def test_plot_sweep_of_text_runs(tmp_path):
    rows = compare_runs([("T=1", text_metrics()), ("T=2", _worse_distilled(text_metrics()))])
    for row, t in zip(rows, (1, 2)):
        row["params"] = {"temperature": t}
    assert plot_sweep(rows, "temperature", tmp_path / "t.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_report_and_compare_of_text_runs(tmp_path, capsys):
    old = text_metrics()
    old["perplexity_gain"], old["loss_gap_recovered"] = 99.0, None  # written by an older version
    for name, metrics in (("a", old), ("b", _worse_distilled(text_metrics()))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(metrics))
    assert main(["report", str(tmp_path / "a")]) == 0
    refreshed = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert refreshed["perplexity_gain"] == pytest.approx(3.5678, abs=1e-4)
    assert "+3.57" in (tmp_path / "a" / "report.md").read_text()
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "| 48.00 | +3.57 | 21.4% |" in out and "| 54.60 | -3.03 | -17.0% |" in out

