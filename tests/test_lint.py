"""The lint gate, the same three checks as .pre-commit-config.yaml: `ruff format --check` (one line
length, pyproject.toml's [tool.ruff]), `ruff check` with the rules [tool.ruff.lint] selects, and
`mypy services prism` ([tool.mypy]) find nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_tool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_ruff_finds_nothing():
    run = run_tool("ruff", "check", "--no-cache", ".")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def test_the_tree_is_formatted():
    run = run_tool("ruff", "format", "--check", "--no-cache", ".")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


def test_mypy_finds_nothing(tmp_path):
    # A cache of its own: a stale one (another checkout's, an older tree's) must not hide an error.
    run = run_tool("mypy", "--cache-dir", str(tmp_path / "mypy-cache"), "services", "prism", timeout=600)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
