"""bench/ballooning.py without a GPU: the fleet of dummy-weight models it serves instead of its two
default ones (issue 21, part 5: ballooning where the weights leave little KV on the card)."""

from __future__ import annotations

import json

import pytest
from bench_scripts import load_bench_script


def test_a_fleet_names_each_model_by_size_and_points_at_its_config(tmp_path):
    bench = load_bench_script("ballooning")
    assert bench.gpu_models("8b=3,3b=2") == {
        "8b-0": "llama-3.1-8b",
        "8b-1": "llama-3.1-8b",
        "8b-2": "llama-3.1-8b",
        "3b-0": "llama-3.2-3b",
        "3b-1": "llama-3.2-3b",
    }
    assert bench.gpu_models(None) == {"llama-1b": "llama-3.2-1b", "llama-3b": "llama-3.2-3b"}
    path, names = bench.write_config(tmp_path, "cuda", 1000.0, "8b=1,1b=1")
    config = json.loads(path.read_text())
    assert names == ["8b-0", "1b-0"]
    assert [m["model_path"].rsplit("/", 1)[1] for m in config] == ["llama-3.1-8b", "llama-3.2-1b"]
    assert all(m["load_format"] == "dummy" and m["init_placements"] == [{"gpu_ids": [0], "on": True}] for m in config)


def test_a_fleet_of_an_unknown_size_is_refused():
    bench = load_bench_script("ballooning")
    with pytest.raises(SystemExit, match="SIZE=COUNT"):
        bench.gpu_models("70b=1")
