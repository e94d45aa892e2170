"""The docs site: the generated reference pages are what docs/generate.py
makes from the code now (the config's field tables, the gateway's OpenAPI,
the protos), `mkdocs build --strict` passes (no broken link, no page left out
of the navigation), and no page names a path outside the repository."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from services.common import placement_config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "docs"))
import generate  # noqa: E402


def test_the_generated_reference_is_current():
    for name, make in generate.PAGES.items():
        assert (ROOT / "docs" / "reference" / name).read_text() == make(), (
            f"docs/reference/{name} is stale: python docs/generate.py"
        )


def test_the_config_reference_names_every_field_the_parser_takes():
    page = (ROOT / "docs" / "reference" / "config.md").read_text()
    for fields in (placement_config._MODEL_FIELDS, placement_config._PLACEMENT_FIELDS, placement_config._SLO_FIELDS):
        for name in fields:
            assert f"`{name}`" in page
    # A field the tables do not name is refused, so the reference cannot miss one the parser takes.
    with pytest.raises(placement_config.ConfigError, match="unknown field"):
        placement_config.parse(
            [{"model_name": "m", "model_path": "p", "new_field": 1, "init_placements": [{"gpu_ids": [0]}]}]
        )


def test_the_api_references_cover_the_endpoints_and_services():
    rest = (ROOT / "docs" / "reference" / "rest.md").read_text()
    for endpoint in ("POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "GET /health"):
        assert f"`{endpoint}`" in rest
    grpc_page = (ROOT / "docs" / "reference" / "grpc.md").read_text()
    assert "### service `Gateway`" in grpc_page and "rpc Generate(GenerateRequest)" in grpc_page
    assert "| `request_id` | string | Carried through gateway" in grpc_page


def test_mkdocs_builds_strict(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "site" / "reference" / "config" / "index.html").exists()


def test_no_page_names_a_path_outside_the_repository():
    pages = [*(ROOT / "docs").rglob("*.md"), ROOT / "README.md", ROOT / "deploy" / "README.md"]
    for page in pages:
        text = page.read_text()
        assert not re.search(r"\.\./shared|/work/|\.\./\.\./", text), page
