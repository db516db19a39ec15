"""The run report: figures, the self-contained HTML page, the Markdown page, write_report."""

from __future__ import annotations

import base64
import copy
import re

import pytest

from kdistill.report import (
    comparison_table,
    plot_confusion_matrix,
    plot_stage_curves,
    render_html,
    render_markdown,
    write_report,
)
from kdistill.report.content import stage_label

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _model(acc: float, params: int, latency: float, throughput: float, seconds: float) -> dict:
    return {"test_accuracy": acc, "parameters": params, "size_bytes": 4 * params + 1234,
            "latency_ms": latency, "latency_p90_ms": 1.25 * latency, "latency_batch": 1,
            "throughput": throughput, "throughput_batch": 256, "train_seconds": seconds, "reused": False}


def _confusion(n: int = 10, per_class: int = 1000, correct: float = 0.9) -> list[list[int]]:
    rows = []
    for i in range(n):
        row = [0] * n
        row[i] = int(per_class * correct)
        row[(i + 1) % n] = per_class - row[i]
        rows.append(row)
    return rows


def example_metrics() -> dict:
    """A ``metrics.json`` as the run engine writes it (teacher, scratch and distilled)."""
    return {
        "kdistill_version": "0.1.0",
        "name": "fashion_mnist-kd-classic_cnn",
        "config": {
            "dataset": {"name": "fashion_mnist"},
            "teacher": {"name": "classic_teacher", "checkpoint": None},
            "student": {"name": "classic_student", "checkpoint": None},
            "stages": {
                "teacher": {"epochs": 1},
                "scratch": {"epochs": 2},
                "distil": {"epochs": 2, "alpha": 0.1, "temperature": 10,
                           "losses": [{"name": "kd", "weight": 1.0}]},
            },
        },
        "dataset": {"name": "fashion_mnist", "train": 60000, "labelled": 60000, "unlabelled": 0, "test": 10000,
                    "num_classes": 10, "class_names": CLASSES, "input_shape": [1, 28, 28]},
        "stages": ["teacher", "scratch", "distil"],
        "models": {
            "teacher": _model(0.8734, 1_400_000, 1.2, 5000.0, 420.0),
            "scratch": _model(0.8312, 21_000, 0.3, 60000.0, 60.0),
            "distil": _model(0.8523, 21_000, 0.3, 60000.0, 75.0),
        },
        "distillation_gain_points": 2.11,
        "accuracy_recovered": 0.5,
        "agreement": {"scratch": 0.88, "distil": 0.93},
        "confusion_matrix": _confusion(),
        "histories": {
            "teacher": {"epoch": [0], "history": {"loss": [0.52], "accuracy": [0.81],
                                                  "val_loss": [0.4], "val_accuracy": [0.8734]}},
            "scratch": {"epoch": [0, 1], "history": {"loss": [0.7, 0.5], "accuracy": [0.75, 0.82],
                                                     "val_loss": [0.55, 0.47], "val_accuracy": [0.8, 0.8312]}},
            "distil": {"epoch": [0, 1], "history": {
                "loss": [0.9, 0.6], "student_loss": [0.7, 0.5], "distillation_loss": [1.1, 0.7],
                "accuracy": [0.76, 0.84], "val_loss": [0.6, 0.45], "val_student_loss": [0.55, 0.44],
                "val_accuracy": [0.81, 0.8523]}},
        },
        "fingerprints": {"teacher": "t0", "scratch": "s0", "distil": "d0"},
        "machine": {"platform": "Linux-6.1-x86_64", "processor": "x86_64", "cpu_count": 2, "torch_threads": 2,
                    "torch": "2.13.0", "python": "3.11.2", "cuda": None},
        "timing": {"wall_seconds": 560.0, "stages": {"teacher": 420.0, "scratch": 60.0, "distil": 75.0}},
        "warnings": [],
    }


def without_scratch(metrics: dict) -> dict:
    """The same run without the scratch stage (the engine then records no gain)."""
    m = copy.deepcopy(metrics)
    m["stages"].remove("scratch")
    del m["models"]["scratch"], m["histories"]["scratch"], m["agreement"]["scratch"]
    m["distillation_gain_points"] = None
    m["accuracy_recovered"] = None
    return m


def _data_uris(page: str) -> list[bytes]:
    encoded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    return [base64.b64decode(b64, validate=True) for b64 in encoded]


# -- figures ----------------------------------------------------------------------------


def test_plot_stage_curves_writes_a_png_with_one_epoch_and_missing_keys(tmp_path):
    histories = example_metrics()["histories"]
    histories["no_accuracy"] = {"epoch": [0], "history": {"loss": [1.0]}}
    histories["empty"] = {"epoch": [], "history": {}}
    path = plot_stage_curves(histories, tmp_path / "f" / "curves.png")
    assert path == tmp_path / "f" / "curves.png"
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in path.parent.iterdir()] == ["curves.png"]  # no temp file left
    assert plot_stage_curves({}, tmp_path / "none.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_confusion_matrix_normalises_rows_and_checks_its_input(tmp_path):
    matrix = _confusion()
    matrix[3] = [0] * 10  # a class absent from the test set: no division by zero
    path = plot_confusion_matrix(matrix, CLASSES, tmp_path / "c.png", title="distilled")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert plot_confusion_matrix(_confusion(30), None, tmp_path / "big.png").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="square"):
        plot_confusion_matrix([[1, 2, 3], [4, 5, 6]], None, tmp_path / "x.png")
    with pytest.raises(ValueError, match="class_names has 2 names .* 10 classes"):
        plot_confusion_matrix(_confusion(), ["a", "b"], tmp_path / "x.png")


# -- HTML -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    m, folder = example_metrics(), tmp_path_factory.mktemp("figures")
    return {
        "curves": plot_stage_curves(m["histories"], folder / "curves.png"),
        "confusion": plot_confusion_matrix(m["confusion_matrix"], CLASSES, folder / "confusion.png"),
    }


def test_html_is_self_contained_with_images_embedded(figures):
    page = render_html(example_metrics(), figures)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert 'src="http' not in page and "<link" not in page and "url(" not in page and "@import" not in page
    assert "Content-Security-Policy" in page and "img-src data:" in page
    images = _data_uris(page)
    assert len(images) == page.count("<img") == 2
    assert all(data[:8] == PNG_MAGIC for data in images)
    assert images[0] == figures["curves"].read_bytes()
    assert "document.body.dataset.imagesLoaded" in page and "naturalWidth" in page


def test_html_has_the_table_headline_experiment_and_machine(figures):
    page = render_html(example_metrics(), figures)
    table = page[page.index('<table class="comparison"'):page.index("</table>")]
    rows = re.findall(r"<tr class=\"(\w+)\"", table)
    assert rows == ["teacher", "scratch", "distilled"]  # "distil" is displayed "distilled"
    for text in ("87.34%", "83.12%", "85.23%", "1,400,000", "21,000", "5.3 MiB",
                 "1.200 / 1.500", "0.300 / 0.375", "5,000", "60,000", "4.0x / 12.0x", "420 s", "latency b=1",
                 "throughput b=256"):
        assert text in table, text
    assert "+2.11 points" in page and "50.0%" in page  # gain, recovered
    assert "88.0%" in page and "93.0%" in page  # agreement of scratch and distilled
    for text in ("<code>fashion_mnist</code>", "60,000 training samples", "10,000 test", "10 classes",
                 "<code>classic_teacher</code>", "<code>classic_student</code>", "loss kd", "alpha 0.1",
                 "temperature 10", "torch 2.13.0", "2 PyTorch thread(s)"):
        assert text in page, text
    assert "Training per stage" in page and "Confusion matrix of the distilled student" in page  # captions


def test_html_escapes_text_from_the_metrics(figures):
    m = example_metrics()
    m["name"] = '<script>alert("x")</script>'
    m["machine"]["processor"] = "Fast & <Cheap>"
    m["config"]["stages"]["distil"]["losses"] = [{"name": "<b>kd</b>", "weight": 1.0}]
    page = render_html(m, figures)
    assert '<script>alert("x")</script>' not in page
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in page
    assert "Fast &amp; &lt;Cheap&gt;" in page and "&lt;b&gt;kd&lt;/b&gt;" in page and "<b>" not in page
    assert page.count("<script>") == 1  # only the page's own load handler


def test_html_template_escapes_config_values_warnings_and_figure_keys(figures):
    m = example_metrics()
    m["config"]["student"] = {"name": "<script>alert(1)</script>", "checkpoint": None}
    m["dataset"]["name"] = 'mnist" onmouseover="alert(1)'
    m["warnings"] = ["<img src=x onerror=alert(1)>"]
    page = render_html(m, {'x" onload="alert(1)': figures["curves"]})
    assert "<code>&lt;script&gt;alert(1)&lt;/script&gt;</code>" in page
    assert "<code>mnist&#34; onmouseover=&#34;alert(1)</code>" in page
    assert "<strong>Warning:</strong> &lt;img src=x onerror=alert(1)&gt;." in page
    assert 'id="figure-x&#34; onload=&#34;alert(1)"' in page
    assert page.count("<script>") == 1 and "<img src=x" not in page and 'onload="' not in page


def test_html_missing_figure_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="figure 'curves' not found"):
        render_html(example_metrics(), {"curves": tmp_path / "nope.png"})


# -- Markdown ---------------------------------------------------------------------------


def test_markdown_has_the_table_headline_and_relative_image_links(figures):
    text = render_markdown(example_metrics(), figures, base=figures["curves"].parent)
    assert text.startswith("# Knowledge distillation: fashion_mnist-kd-classic_cnn\n")
    assert "| model | parameters | size on disk | test accuracy" in text
    assert "| distilled | 21,000 |" in text and "| 85.23% |" in text and "| teacher | 1,400,000 |" in text
    assert "+2.11 points" in text and "50.0%" in text and "93.0%" in text
    assert "](curves.png)" in text and "](confusion.png)" in text
    assert "<script>" not in render_markdown({**example_metrics(), "name": "<script>"}, {})
    # without a base, absolute paths become file names
    assert "](confusion.png)" in render_markdown(example_metrics(), figures)


def test_markdown_table_is_the_comparison_table_of_the_run_models():
    m = example_metrics()
    text = render_markdown(m, {})
    table = comparison_table({stage_label(s): m["models"][s] for s in m["stages"]})
    assert "\n" + table + "\n" in text
    assert table.splitlines()[4].startswith("| distilled | 21,000 | 83.2 KiB | 85.23% |")


def test_markdown_report_warns_and_advises():
    m = example_metrics()
    m["warnings"] = ["the distil stage's training loss ended at 12, more than 10x its first epoch's (0.9)"]
    m["models"]["distil"]["test_accuracy"] = 0.8212
    m["distillation_gain_points"], m["accuracy_recovered"] = -1.0, -0.237
    text = render_markdown(m, {})
    assert "**Warning:** the distil stage's training loss ended at 12" in text
    assert "- **-1.00 points** distilled vs the same student from scratch" in text
    assert "- **-23.7%** of the teacher-scratch accuracy gap recovered" in text
    assert "**Why no gain here:** The student did not catch up" in text


# -- write_report -----------------------------------------------------------------------


def _check_run_dir(run_dir, written, expected_figures):
    assert sorted(k for k in written if k not in ("markdown", "html")) == sorted(expected_figures)
    for key in expected_figures:
        assert written[key] == run_dir / "figures" / f"{key}.png"
        assert written[key].read_bytes()[:8] == PNG_MAGIC
    assert written["markdown"] == run_dir / "report.md" and written["html"] == run_dir / "report.html"
    page = written["html"].read_text(encoding="utf-8")
    assert len(_data_uris(page)) == len(expected_figures)
    md = written["markdown"].read_text(encoding="utf-8")
    for key in expected_figures:
        assert f"](figures/{key}.png)" in md
    leftovers = [p.name for p in run_dir.rglob("*.tmp")]
    assert leftovers == []
    return page, md


def test_write_report_full_run(tmp_path):
    written = write_report(tmp_path, example_metrics())
    page, md = _check_run_dir(tmp_path, written, ["accuracy", "curves", "confusion"])
    assert "85.23%" in page and "| distilled |" in md


def test_write_report_reads_metrics_json(tmp_path):
    import json

    (tmp_path / "metrics.json").write_text(json.dumps(example_metrics()))
    assert write_report(tmp_path)["html"].is_file()
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        write_report(tmp_path / "empty")


def test_write_report_without_scratch(tmp_path):
    written = write_report(tmp_path, without_scratch(example_metrics()))
    page, md = _check_run_dir(tmp_path, written, ["accuracy", "curves", "confusion"])
    assert re.findall(r"<tr class=\"(\w+)\"", page) == ["teacher", "distilled"]
    assert "no scratch student in this run" in page and "no scratch student in this run" in md
    assert "| scratch |" not in md and "93.0%" in page


def test_write_report_teacher_used_as_is(tmp_path):
    """A teacher loaded from a checkpoint and not trained has no history: no curve of its own."""
    m = example_metrics()
    del m["histories"]["teacher"]
    m["models"]["teacher"]["train_seconds"], m["models"]["teacher"]["reused"] = 0.0, "teacher.pt"
    written = write_report(tmp_path, m)
    page, md = _check_run_dir(tmp_path, written, ["accuracy", "curves", "confusion"])
    assert "<td>0 s (reused)</td>" in page and "teacher 0 s (reused)" in md


def test_write_report_with_missing_measurements(tmp_path):
    """A model without speed numbers and an epoch without a test evaluation: n/a, not a crash."""
    m = example_metrics()
    del m["models"]["scratch"]["latency_ms"], m["models"]["scratch"]["throughput"]
    m["histories"]["distil"]["history"]["val_accuracy"][0] = None
    m["dataset"]["class_names"] = None
    written = write_report(tmp_path, m)
    page, md = _check_run_dir(tmp_path, written, ["accuracy", "curves", "confusion"])
    assert "| scratch | 21,000 | 83.2 KiB | 83.12% | n/a / 0.375 | n/a | n/a / n/a |" in md
    assert "<td>n/a / 0.375</td>" in page and "| distilled | 21,000 |" in md
