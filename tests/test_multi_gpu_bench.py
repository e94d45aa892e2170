"""bench/multi_gpu.py without GPUs: the scaled model mix and its static
layout, the trace, and the tables and plot from the committed 4-GPU result.
(The whole run on CPU devices: `python bench/multi_gpu.py --device cpu ...`,
as its docstring says; the cluster path it drives is tested in
test_tensor_parallel.py.)"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
from bench_scripts import load_bench_script

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    return load_bench_script("multi_gpu")


def _args(**kw) -> argparse.Namespace:
    base = dict(device="cuda", gpus=4, models=0, large_tp=4, rate=12.0, duration=60.0, seed=0)
    return argparse.Namespace(**{**base, **kw})


def test_four_gpus_get_half_the_original_mix_with_the_70b_split_over_all_four(tmp_path):
    bench = _bench()
    entries = bench.model_entries(_args(), tmp_path)
    assert len(entries) == 9  # 18 models on 8 GPUs, scaled to 4
    *small, large = entries
    assert Path(large["model_path"]).name == "llama-3.1-70b" and large["tp_size"] == 4
    assert large["init_placements"] == [{"gpu_ids": [0, 1, 2, 3], "on": False}]
    assert [Path(e["model_path"]).name for e in small[:3]] == ["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"]
    assert [e["init_placements"][0]["gpu_ids"] for e in small] == [[i % 4] for i in range(8)]
    assert all(e["load_format"] == "dummy" and e["tp_size"] == 1 for e in small)
    # Two GPUs: no room for a split over four; every model whole.
    two = bench.model_entries(_args(gpus=2), tmp_path)
    assert len(two) == 4 and all(e["tp_size"] == 1 for e in two)


def test_the_cpu_dry_run_splits_a_tiny_model_and_its_trace_covers_every_model(tmp_path):
    bench = _bench()
    entries = bench.model_entries(_args(device="cpu", gpus=2, large_tp=2, models=3), tmp_path)
    assert [e["tp_size"] for e in entries] == [1, 1, 2]
    assert (Path(entries[0]["model_path"]) / "config.json").exists()
    trace, params = bench.make_trace(_args(device="cpu", models=3, duration=30.0), [e["model_name"] for e in entries])
    assert params.num_groups == 3 and trace.requests
    assert {r.model for r in trace.requests} <= {e["model_name"] for e in entries}
    assert max(r.prompt_tokens for r in trace.requests) <= 128  # the tiny models hold 256 positions


RESULT = ROOT / "bench" / "results" / "multi_gpu-h200x4.json"


def test_the_committed_four_gpu_result_prints_its_tables(capsys):
    _bench().print_tables(json.loads(RESULT.read_text()))
    out = capsys.readouterr().out
    assert "activation within 1.5 s: True" in out
    rows = [line.split() for line in out.splitlines()]
    policies = [r[0] for r in rows if r and r[0] in ("prism", "time-share", "static")]
    assert policies == ["prism", "time-share", "static"]
    assert any(r[:2] == ["model-8", "(3.1-70b)"] for r in rows)  # the per-model table names the split model


def test_the_committed_four_gpu_result_plots_memory_over_time(tmp_path):
    pytest.importorskip("matplotlib", reason="the bench extra (pip install '.[bench]') draws the plot")
    _bench().plot_memory(json.loads(RESULT.read_text()), tmp_path / "memory.png")
    assert (tmp_path / "memory.png").stat().st_size > 0


def test_the_simulated_run_prints_the_measured_one_beside_it(tmp_path, monkeypatch, capsys):
    """bench/multi_gpu_simulated.py on 4 GPUs (20 s traces, seeds 0-2): every policy runs, the 70B is one
    split model among 9, the comparison with the committed measured run prints model by model (its live
    column the measured file's numbers), and the attainment per seed last. Whether the two agree is the
    bench's finding, not asserted: its split-step factor was fitted to that measured run."""
    sim = load_bench_script("multi_gpu_simulated")
    out = tmp_path / "sim.json"
    monkeypatch.setattr(
        sys,
        "argv",
        ["multi_gpu_simulated.py", "--gpus", "4", "--duration", "20", "--measured", str(RESULT), "--out", str(out)],
    )
    sim.main()
    payload = json.loads(out.read_text())
    run = payload["by_gpus"]["4"]
    assert [m["tp_size"] for m in run["models"]] == [1] * 8 + [4]
    assert [r["policy"] for r in run["runs"]] == ["prism", "static", "time-share"]
    for r in run["runs"]:
        assert r["requests"] == run["trace"]["requests"] > 0 and 0.0 <= r["attainment"] <= 1.0
        assert set(r["per_model"]) <= {m["name"] for m in run["models"]}
    assert [(row["gpus"], row["seed"]) for row in payload["attainment"]] == [(4, 0), (4, 1), (4, 2)]
    assert payload["attainment"][0]["prism"] == run["runs"][0]["attainment"]
    printed = capsys.readouterr().out
    assert "measured (multi_gpu-h200x4.json" in printed and "prism live  prism sim" in printed
    measured = {r["policy"]: r["attainment"] for r in json.loads(RESULT.read_text())["runs"]}
    simulated = {r["policy"]: r["attainment"] for r in run["runs"]}
    comparison = printed[printed.index("measured (multi_gpu-h200x4.json") :]
    lines = [line.split() for line in comparison.splitlines()]
    header = next(words for words in lines if words[:2] == ["attainment", "%"])  # then "<policy> live|sim" pairs
    total = next(words for words in lines if words[:1] == ["all"])
    shown = dict(zip(zip(header[2::2], header[3::2]), map(float, total[1:])))
    assert {p for p, _ in shown} == set(simulated) & set(measured)
    for (policy, column), value in shown.items():
        assert value == pytest.approx(100 * (measured if column == "live" else simulated)[policy], abs=0.05)
    assert printed.rstrip().splitlines()[-3].split()[:2] == ["4", "0"]  # the seeds' table is printed last
