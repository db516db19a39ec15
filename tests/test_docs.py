"""The documentation: every relative link of the README and the docs points to a file (and a
heading) that exists, and the site builds with ``mkdocs build --strict`` (zero warnings),
with the API pages and the experiment-file reference generated from the config schema."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*$", re.M)
_EXPLICIT_ID = re.compile(r"\{\s*#([\w-]+)[^}]*\}\s*$")


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts)]


def _without_code(text: str) -> str:
    return _CODE.sub("", _FENCE.sub("", text))


def _anchors(page: Path) -> set[str]:
    """The heading ids of a Markdown page, as GitHub and MkDocs write them."""
    ids = set()
    for heading in _HEADING.findall(_FENCE.sub("", page.read_text(encoding="utf-8"))):
        explicit = _EXPLICIT_ID.search(heading)
        if explicit:
            ids.add(explicit.group(1))
            continue
        text = re.sub(r"[^\w\- ]", "", heading.replace("`", "").lower())
        ids.add(text.replace(" ", "-"))
    return ids


def _relative_links(page: Path) -> list[str]:
    links = _LINK.findall(_without_code(page.read_text(encoding="utf-8")))
    return [link for link in links if not re.match(r"^([a-z][a-z0-9+.-]*:|#)", link, re.I)]


def test_link_checker_sees_the_links():
    # the README and the docs link to each other; a parser that found nothing would pass vacuously
    assert "docs/main_job.md" in _relative_links(ROOT / "README.md")
    assert "python_api.md" in _relative_links(DOCS / "index.md")
    assert "export-and-deployment-checks" in _anchors(DOCS / "experiments.md")


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(page):
    broken = []
    for link in _relative_links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve()
        if not target.exists():
            broken.append(f"{link}: no file {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")
        elif DOCS in page.parents and DOCS not in target.parents:
            # the site holds docs/ only: write paths outside it as code, not as links
            broken.append(f"{link}: outside docs/, so not part of the site")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{link}: no heading #{anchor} in {target.name}")
    assert not broken, f"{page.relative_to(ROOT)} has broken links:\n  " + "\n  ".join(broken)


def test_every_docs_page_is_in_the_nav():
    yaml = pytest.importorskip("yaml")

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("", lambda loader, suffix, node: None)  # !!python/name: tags
    config = yaml.load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"), Loader=_Loader)

    def pages(nav):
        for item in nav:
            if isinstance(item, str):
                yield item
            else:
                for value in item.values():
                    yield from (pages(value) if isinstance(value, list) else [value])

    in_nav = set(pages(config["nav"]))
    on_disk = {str(p.relative_to(DOCS)) for p in _pages()[1:]}
    assert on_disk - in_nav == set(), "pages missing from the nav of mkdocs.yml"
    assert in_nav - on_disk == set(), "nav entries without a page"


def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert not re.search(r"^WARNING\b", output, re.M), output

    for page in ("index.html", "getting_started/index.html", "main_job/index.html", "api/index.html"):
        assert (site / page).is_file(), page
    api = {
        "distiller": "kdistill.distiller.Distiller",
        "losses": "kdistill.losses.kd_loss",
        "teacher": "kdistill.teacher.TeacherCache",
        "callbacks": "kdistill.callbacks.EarlyStopping",
        "data": "kdistill.data.load_dataset",
        "models": "kdistill.models.build_model",
        "export": "kdistill.export.export_onnx",
        "bench": "kdistill.bench.benchmark_model",
        "config": "kdistill.config.load_config",
        "run": "kdistill.run.store",
    }
    for module, anchor in api.items():
        html = (site / "api" / module / "index.html").read_text(encoding="utf-8")
        assert f'id="{anchor}"' in html, f"api/{module}: no {anchor}"
    # the docstrings' reST roles became links or code, never literal text
    assert not re.search(r":(class|func|meth|mod|data|attr|exc):`", (site / "api/distiller/index.html").read_text(encoding="utf-8"))

    from kdistill.config import ExperimentConfig

    reference = (site / "config_reference/index.html").read_text(encoding="utf-8")
    schema = ExperimentConfig.model_json_schema()
    for key in schema["properties"]:
        assert f"<code>{key}</code>" in reference, f"top-level key {key} missing from the reference"
    for key in ("temperature", "teacher_cache", "alpha", "stages.distil", "data.augment[]"):
        assert f"<code>{key}</code>" in reference, key
    assert "<!-- config-reference -->" not in reference
