"""The HTML report in a real (headless) browser: the page loads, its images decode, it draws.

Skipped where no Chromium is installed (Debian: ``apt-get install -y chromium``).
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from test_html import example_metrics

from kdistill.report import write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium or chromium-browser on PATH; install it with `apt-get install -y chromium` (Debian)",
)
TIMEOUT_S = 60  # a cold start of Chromium takes a few seconds; this only guards against a hang


def _chromium(tmp_path, *args: str) -> subprocess.CompletedProcess:
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    written = write_report(run_dir, example_metrics())
    return run_dir, written["html"]


def test_the_page_loads_and_every_image_decodes(report, tmp_path):
    _, page = report
    done = _chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", page.as_uri())
    dom = done.stdout
    assert done.returncode == 0 and "<table" in dom, done.stderr[-2000:]
    table = dom[dom.index('<table class="comparison"'):dom.index("</table>")]
    assert re.search(r'<tr class="distilled"[^>]*>.*?85\.23%', table, re.S), table
    images = dom.count("<img")
    assert images >= 3  # accuracy, curves, confusion
    loaded = re.search(r'<body[^>]*\bdata-images-loaded="(\d+)"', dom)
    assert loaded, "the load handler did not run: " + dom[dom.index("<body"):][:200]
    assert int(loaded.group(1)) == images


def test_the_page_draws_something(report, tmp_path):
    from matplotlib.image import imread

    _, page = report
    shot = tmp_path / "shot.png"
    done = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", page.as_uri())
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = imread(shot)  # (H, W, 3 or 4) floats in [0, 1]
    assert pixels.shape[:2] == (2000, 1280)
    rgb = pixels[..., :3]
    assert rgb.std() > 0.02  # not a blank page
    assert (rgb < 0.95).any(axis=-1).mean() > 0.01  # not all white: text, table and figures drew
