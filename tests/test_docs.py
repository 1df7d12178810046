"""The docs site (`mkdocs.yml`, `docs/`): the real `mkdocs build --strict`, which fails on a
broken link or anchor and on a page left out of the nav, and the reference pages its hook
(`docs/hooks/reference.py`) generates from the code."""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from server.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def _hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "docs_reference", REPO / "docs/hooks/reference.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mkdocs", reason="the docs extra (mkdocs) is not installed")
    pytest.importorskip("material", reason="the docs extra (mkdocs-material) is not installed")
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=REPO,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return out


def _page(site: Path, name: str) -> str:
    """A built page's article (no navigation), tags and entities removed."""
    raw = (site / name / "index.html").read_text()
    article = re.search(r"<article\b.*?</article>", raw, re.DOTALL)
    assert article is not None, name
    return html.unescape(re.sub(r"<[^>]+>", "", article.group()))


def test_every_setting_is_a_row_with_its_flag_variable_and_default() -> None:
    rows = list(_hook().settings_rows())
    assert len(rows) == len(Settings.model_fields)
    by_name = dict(zip(Settings.model_fields, rows, strict=True))
    for name, field in Settings.model_fields.items():
        flag, variable, default, description = by_name[name]
        assert flag.startswith(f"`--{name.replace('_', '-')}`"[:-1]), flag
        assert variable == f"`MICROBATCH_{name.upper()}`"
        assert default, name
        assert description.startswith(" ".join((field.description or "").split())), name
    assert by_name["compile"][:3] == ("`--compile / --no-compile`", "`MICROBATCH_COMPILE`", "on")
    assert by_name["max_wait_ms"][2] == "`50.0`"
    assert by_name["policy"][3].endswith("One of: `adaptive`, `window`.")


def test_the_strict_build_makes_every_reference_page(site: Path) -> None:
    settings = _page(site, "reference/settings")
    cli = _page(site, "reference/cli")
    for name in Settings.model_fields:
        flag, variable = "--" + name.replace("_", "-"), "MICROBATCH_" + name.upper()
        assert flag in settings, name
        assert variable in settings, name
        assert flag in cli, name  # microbatch serve --help
    assert "--max-wait-ms float" in cli
    for command in ("bench", "sweep", "plot", "soak"):
        assert f"usage: microbatch {command}" in cli

    metrics = _page(site, "reference/metrics")
    for name in (
        "microbatch_client_disconnects_total",
        "microbatch_queue_depth",
        "microbatch_queue_wait_seconds",
        "microbatch_oldest_item_age_seconds",
        "microbatch_items_total",
        "process_resident_memory_bytes",
    ):
        assert name in metrics, name
    gpu_only = metrics[metrics.index("On CUDA only") : metrics.index("The process")]
    assert "microbatch_gpu_memory_allocated_bytes" in gpu_only
    assert "device" in gpu_only
    assert "_created" not in metrics.replace("NAME_created", "")


def test_every_metric_the_guide_names_is_served(site: Path) -> None:
    """A metric renamed in the code and not in the hand-written pages fails here."""
    served = set(
        re.findall(r"\b(?:microbatch|process)_[a-z0-9_]+", _page(site, "reference/metrics"))
    )
    texts = [p.read_text() for p in sorted((REPO / "docs").glob("*.md"))]
    texts.append((REPO / "README.md").read_text())
    named = {m for text in texts for m in re.findall(r"\bmicrobatch_[a-z0-9_]+", text)}
    unknown = sorted(
        m for m in named if m not in served and re.sub(r"_(bucket|sum|count)$", "", m) not in served
    )
    assert len(named) > 20
    assert unknown == [], f"metrics the docs name that no server exposes: {unknown}"


def test_the_readmes_links_lead_to_files_and_headings_that_exist(site: Path) -> None:
    """The README is not part of the site, so the build does not check its links."""
    readme = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)#\s]+)(?:#([^)\s]+))?\)", readme)
    local = [(path, anchor) for path, anchor in links if "://" not in path]
    assert len(local) > 10
    for path, anchor in local:
        assert (REPO / path).exists(), path
        if anchor:
            built = site / Path(path).relative_to("docs").with_suffix("") / "index.html"
            assert f'id="{anchor}"' in built.read_text(), f"{path}#{anchor}"
