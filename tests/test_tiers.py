"""Every test module has a tier (tests/tiers.py), and only a known one: a
module left out would run under no marker and `pytest -m unit` would
silently skip it."""

from __future__ import annotations

from pathlib import Path

from tests.tiers import TIERS

TESTS = Path(__file__).resolve().parent


def test_every_test_module_has_a_tier():
    modules = {path.stem for path in TESTS.glob("test_*.py")}
    assert sorted(modules - set(TIERS)) == [], "add these to tests/tiers.py"
    assert sorted(set(TIERS) - modules) == [], "tests/tiers.py names modules that are gone"
    assert set(TIERS.values()) <= {"unit", "cluster", "cuda", "lint"}


def test_gpu_modules_are_in_the_cuda_tier():
    assert all(tier == "cuda" for module, tier in TIERS.items() if module.endswith("_cuda"))
