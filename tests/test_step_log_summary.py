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
    assert len(intervals) == 4 and intervals[0][2:] == ("a", 4, 0, 0, "graph")
    table = bench.contention(intervals, lambda engine, decode, prefill, seqs: 0.010, lambda engine: engine)
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


def test_steps_with_prompt_tokens_get_tables_of_their_own():
    """A mixed step (decoding sequences and a prompt chunk) and a prefill-only step go into "GROUP mixed"
    and "GROUP prefill", priced with their prompt tokens; eager pure decode steps into none."""
    bench = load_bench_script("step_log_summary")
    lines = [
        line("00,040", "a", 4, 40.0, kind="eager", prefill=64),  # a mixed step alone: 0.000-0.040
        line("01,020", "a", 0, 20.0, kind="eager", prefill=128),  # a prefill step: 1.000-1.020
        line("01,020", "b", 2, 20.0),  # b's graph decode step beside it, all of it
        line("02,010", "a", 4, 10.0, kind="eager"),  # eager pure decode: in no table
    ]
    intervals = bench.summarize(lines).pop("intervals")
    priced = []

    def alone_s(engine, decode, prefill, seqs):
        priced.append((engine, decode, prefill, seqs))
        return 0.001 * (decode + prefill / 16)

    table = bench.contention(intervals, alone_s, lambda engine: engine)
    assert set(table) == {"a mixed", "a prefill", "b"}
    assert table["a mixed"]["1-1.05"]["slowdown_p50"] == pytest.approx(40.0 / 8.0)
    # the prefill step: 20 ms against 8 ms alone, beside b's step the whole time (concurrency 2)
    assert table["a prefill"]["2-3"]["slowdown_p50"] == pytest.approx(20.0 / 8.0)
    assert table["a prefill"]["2-3"]["parallelism_p50"] == pytest.approx(2 / (20.0 / 8.0))
    assert ("a", 0, 128, 1) in priced and ("a", 4, 64, 1) in priced
