"""bench/step_log_summary.py's contention table on hand-made step logs: a step's concurrency is the other
engines' step time overlapping it, its slowdown its time over the profile's alone step."""

from __future__ import annotations

import pytest
from bench_scripts import load_bench_script


def line(t: str, engine: str, decode: int, ms: float, kind: str = "graph", prefill: int = 0) -> str:
    return (
        f"2026-12-06 14:00:{t} INFO worker-1 [-] services.gpu_agent.engine.engine: engine {engine} step: "
        f"{decode} decode, {prefill} prefill tokens in {1 if prefill else 0} seqs, {kind}, {ms:.2f} ms "
        "(scheduled in 0.05 ms)"
    )


def test_steps_beside_others_are_binned_by_concurrency_against_the_alone_step():
    bench = load_bench_script("step_log_summary")
    lines = [
        line("00,010", "a", 4, 10.0),  # a alone: 0.000-0.010
        line("01,020", "a", 4, 20.0),  # a: 1.000-1.020, b's step covers all of it
        line("01,030", "b", 4, 30.0),  # b: 1.000-1.030, a's 20 ms beside its 30
        line("02,100", "a", 4, 100.0, kind="eager", prefill=64),  # a prefill: not a graph decode step
    ]
    summary = bench.summarize(lines)
    intervals = summary.pop("intervals")
    assert len(intervals) == 4 and intervals[0][2:] == ("a", 4, 0, "graph")
    table = bench.contention(intervals, lambda engine, decode: 0.010, lambda engine: engine)
    assert table["a"]["1-1.05"] == {
        "steps": 1,
        "slowdown_p50": pytest.approx(1.0),
        "parallelism_p50": pytest.approx(1.0),
    }
    # a's second step: concurrency 1 + 20/20 = 2, twice its alone time: the two took turns (parallelism 1).
    assert table["a"]["2-3"] == {"steps": 1, "slowdown_p50": pytest.approx(2.0), "parallelism_p50": pytest.approx(1.0)}
    # b's: 1 + 20/30 beside it, 3x its alone time.
    assert table["b"]["1.05-2"]["slowdown_p50"] == pytest.approx(3.0)
    assert table["b"]["1.05-2"]["parallelism_p50"] == pytest.approx((1 + 20 / 30) / 3)
