"""The two-regime report: sentences that follow the numbers' signs, tables of the runs'
values, a self-contained page and a figure."""

from __future__ import annotations

import copy
import re

import pytest

from kdistill.regimes import summarize
from kdistill.report.regimes import headline, render_html, table_rows, time_rows, write_regimes_report


def _metrics(labelled, unlabelled, teacher, scratch, distil):
    models = {k: {"test_accuracy": v, "parameters": p, "train_seconds": 1.0, "reused": False}
              for k, v, p in (("teacher", teacher, 1_400_000), ("scratch", scratch, 20_000), ("distil", distil, 20_000))}
    return {
        "name": "t", "dataset": {"name": "fashion_mnist", "train": labelled + unlabelled, "test": 100,
                                 "num_classes": 10, "labelled": labelled, "unlabelled": unlabelled},
        "config": {"teacher": {"name": "classic_teacher", "checkpoint": None},
                   "student": {"name": "classic_student", "checkpoint": None},
                   "stages": {"distil": {"alpha": 0.1, "temperature": 10.0, "epochs": 5}}},
        "models": models,
        "distillation_gain_points": 100 * (distil - scratch),
        "accuracy_recovered": (distil - scratch) / (teacher - scratch) if teacher > scratch else None,
        "agreement": {"scratch": 0.8, "distil": 0.95},
        "timing": {"wall_seconds": 12.0, "stages": {"teacher": 0.2, "scratch": 3.0, "distil": 4.0, "measure": 2.0}},
        "machine": {"processor": "x86_64", "cpu_count": 2, "torch_threads": 1},
    }


@pytest.fixture()
def summary():
    return summarize({"few_labels": _metrics(1000, 59000, 0.89, 0.80, 0.865),
                      "all_labels": _metrics(60000, 0, 0.91, 0.885, 0.87)}, wall_seconds=30.0)


def test_headline_reads_the_numbers_and_their_signs(summary):
    few, every = headline(summary)
    assert "1,000 labels + 59,000 unlabelled images" in few and "beats" in few and "6.50 points" in few
    assert "recovering 72% of the gap" in few
    assert "all 60,000 labels" in every and "falls behind" in every and "1.50 points" in every
    assert "The teacher is 2.50 points ahead" in every and "alpha 0.5" in every
    # an all-label gain is called a gain, with no advice attached
    s = copy.deepcopy(summary)
    s["regimes"]["all_labels"]["accuracy"]["distil"] = 0.888
    s["regimes"]["all_labels"]["gain_points"] = 0.3
    every = headline(s)[1]
    assert "beats" in every and "points ahead" not in every


def test_a_teacher_no_better_than_scratch_is_named_as_the_reason(summary):
    s = copy.deepcopy(summary)
    s["regimes"]["all_labels"]["accuracy"].update(teacher=0.87, scratch=0.885)
    every = headline(s)[1]
    assert "The teacher (87.00%) is no more accurate" in every and "points ahead" not in every


def test_tables_hold_the_summary_values(summary):
    rows = table_rows(summary)
    assert rows[0][:6] == ["few labels + transfer set", "1,000", "59,000", "89.00%", "80.00%", "86.50%"]
    assert rows[0][6] == "+6.50" and rows[0][7] == "72%"
    assert rows[1][6] == "-1.50" and rows[1][7] == "-60%"
    assert time_rows(summary)[0][1] == "teacher 0 s, scratch 3 s, distil 4 s, measure 2 s"


def test_written_report_is_self_contained(summary, tmp_path):
    paths = write_regimes_report(tmp_path, summary)
    page = paths["html"].read_text()
    assert paths["figure"].read_bytes()[:4] == b"\x89PNG"
    assert not re.search(r'src="(?!data:)', page)  # every image embedded
    assert "+6.50" in page and "Content-Security-Policy" in page
    md = paths["markdown"].read_text()
    assert "figures/regimes.png" in md and md.index("few labels") < md.index("| all labels |")
    assert render_html(summary, None).count("<img") == 0


def test_the_page_escapes_names_from_the_runs(summary):
    s = copy.deepcopy(summary)
    s["student"] = "<script>alert(1)</script>"
    s["regimes"]["few_labels"]["title"] = "few & <b>labels</b>"
    page = render_html(s, None)
    assert "<code>&lt;script&gt;alert(1)&lt;/script&gt;</code>" in page
    assert "<td>few &amp; &lt;b&gt;labels&lt;/b&gt;</td>" in page and "<b>" not in page
    assert page.count("<script>") == 1  # only the page's own load handler
