"""bench/one_gpu.py without a GPU: the fleet and the operator's static subset, the sweep's traces, the
highest rate holding a target, the committed H100 result's tables and plot, and the whole flow on the
CPU device with tiny models (a dry run: real etcd, scheduler, agent, gateway and engines)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
from bench_scripts import load_bench_script

ROOT = Path(__file__).resolve().parent.parent
RESULT = ROOT / "bench" / "results" / "one_gpu-h100-kept-kv.json"
GIB = 1 << 30


def _bench():
    return load_bench_script("one_gpu")


def _args(**kw) -> argparse.Namespace:
    base = dict(
        device="cuda",
        fleet="1b=4,3b=4,8b=4",
        group_size=4,
        shift_s=30.0,
        duration=60.0,
        seed=0,
        reserve_gb=14.0,
        static_kv_gb=2.0,
    )
    return argparse.Namespace(**{**base, **kw})


def test_the_fleet_outweighs_an_h100_and_static_serves_the_smallest_that_fit(tmp_path):
    bench = _bench()
    entries = bench.fleet_entries(_args(), tmp_path)
    assert [e["size"] for e in entries] == ["1b"] * 4 + ["3b"] * 4 + ["8b"] * 4
    assert [e["slo"]["ttft_ms"] for e in entries] == [1000.0] * 8 + [2000.0] * 4
    total = sum(bench.weight_bytes(e) for e in entries)
    # 99.8 GB: 1.17 times an H100's 79.2 GiB (85.0 GB) of memory, short of the issue's 1.3 (which counted
    # the card as 80 GB); --fleet 1b=4,3b=4,8b=5 would be 1.36.
    assert total >= 1.15 * 79.19 * GIB
    static = bench.static_entries(entries, int(79.19 * GIB), 14 * GIB, 2 * GIB)
    # 4 x 1B and 4 x 3B (35.6 GB) with 2 GiB of KV each fit beside the reserve; an 8B more does not.
    assert [e["size"] for e in static] == ["1b"] * 4 + ["3b"] * 4
    assert all(e["init_placements"] == [{"gpu_ids": [0], "on": True}] for e in static)
    assert bench.served_entries("prism", entries, _args(), int(79.19 * GIB)) == entries


def test_the_sweeps_traces_share_their_groups_and_differ_in_rate():
    bench = _bench()
    names = [f"model-{i}" for i in range(12)]
    slow = bench.bursty_group_trace(bench.trace_params(_args(), 12, 6.0), names)
    fast = bench.bursty_group_trace(bench.trace_params(_args(), 12, 12.0), names)
    assert slow.metadata["groups"] == fast.metadata["groups"] and len(slow.metadata["groups"]) == 3
    assert slow.metadata["windows"] == fast.metadata["windows"]
    assert 1.7 < len(fast.requests) / len(slow.requests) < 2.3
    params = slow.metadata["params"]
    assert params["burstiness_cv"] >= 2 and params["shift_s"] == 30.0


def test_the_highest_rate_holding_a_target_and_its_interpolation():
    bench = _bench()
    points = [
        {"rate": 4, "attainment": 1.0},
        {"rate": 8, "attainment": 0.95},
        {"rate": 12, "attainment": 0.85},
        {"rate": 16, "attainment": 0.95},
    ]
    assert bench.highest_rate(points, 0.9) == (8, pytest.approx(10.0))  # a later recovery does not count
    assert bench.highest_rate(points, 0.99) == (4, pytest.approx(4 + 4 * 0.01 / 0.05))
    assert bench.highest_rate(points, 0.5) == (16, 16)
    assert bench.highest_rate([{"rate": 4, "attainment": 0.5}], 0.9) == (None, None)


def test_several_seeds_compare_prism_with_the_baselines_on_each_seeds_traces_and_on_their_mean():
    bench = _bench()

    def run(policy, seed, attainments):
        return {
            "policy": policy,
            "seed": seed,
            "served": ["model-0"],
            "points": [{"rate": r, "attainment": a} for r, a in zip((4, 8, 12), attainments)],
        }

    payload = {
        "runs": [
            run("prism", 0, (1.0, 0.95, 0.85)),
            run("kvpr", 0, (1.0, 0.85, 0.8)),
            run("prism", 1, (0.95, 0.75, 0.7)),
            run("kvpr", 1, (1.0, 0.97, 0.92)),
        ]
    }
    rows = {(r["policy"], r["seed"]): r for r in bench.summary(payload)}
    assert rows[("prism", 0)]["interp_0.9"] == pytest.approx(10.0)
    assert rows[("kvpr", 0)]["interp_0.9"] == pytest.approx(4 + 4 * 0.1 / 0.15)
    assert rows[("prism", 0)]["ratio_0.9"] == pytest.approx(1.5)  # against seed 0's kvpr, not seed 1's
    assert rows[("prism", 1)]["ratio_0.9"] == pytest.approx(5.0 / 12)
    # The mean curves: prism (0.975, 0.85, 0.775) holds 90% to 6.4 req/s, kvpr (1.0, 0.91, 0.86) to 8.8.
    assert rows[("prism", "mean")]["interp_0.9"] == pytest.approx(6.4)
    assert rows[("kvpr", "mean")]["interp_0.9"] == pytest.approx(8.8)
    assert rows[("prism", "mean")]["ratio_0.9"] == pytest.approx(6.4 / 8.8)
    assert "ratio_0.9" not in rows[("kvpr", "mean")]

    # A prism+foresight run (--foresight-s) is set against the baselines, never counted as one.
    payload["runs"] += [run("prism+foresight", 0, (1.0, 1.0, 0.95))]
    rows = {(r["policy"], r["seed"]): r for r in bench.summary(payload)}
    assert rows[("prism", 0)]["ratio_0.9"] == pytest.approx(1.5)
    assert rows[("prism+foresight", 0)]["ratio_0.9"] == pytest.approx(12 / (4 + 4 * 0.1 / 0.15))


def test_the_committed_h100_result_prints_its_tables_and_plots(capsys, tmp_path):
    bench = _bench()
    payload = json.loads(RESULT.read_text())
    assert "H100" in payload["device"] and {r["policy"] for r in payload["runs"]} >= {"prism", "time-share", "kvpr"}
    bench.print_tables(payload)
    out = capsys.readouterr().out
    assert "x best baseline 90%" in out.splitlines()[-len(payload["runs"]) - 2]  # the summary table is last
    assert "sim - live" in out
    pytest.importorskip("matplotlib", reason="the bench extra (pip install '.[bench]') draws the plot")
    bench.plot(payload, tmp_path / "one_gpu.png")
    assert (tmp_path / "one_gpu.png").stat().st_size > 0


def test_the_cpu_dry_run_replays_each_policys_points_on_shared_engines_from_a_reset_and_simulates_them(
    tmp_path, monkeypatch, capsys
):
    bench = _bench()
    out = tmp_path / "one_gpu.json"
    # Two policies on one cluster (--share-engines), one short point each: every cluster start costs CI
    # about 20 s and every reset a scheduler start (static's subset is tested above). The reset before
    # time-share's point is the one every point but a cluster's first gets.
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "one_gpu.py",
            "--device",
            "cpu",
            "--policies",
            "prism",
            "time-share",
            "--share-engines",
            "--reset-settle-s",
            "0.5",
            "--rates",
            "3",
            "--duration",
            "3",
            "--settle-s",
            "0.2",
            "--simulate",
            "--state-dir",
            str(tmp_path / "state"),
            "--out",
            str(out),
        ],
    )
    bench.main()
    payload = json.loads(out.read_text())
    assert [r["policy"] for r in payload["runs"]] == ["prism", "time-share"]
    for run in payload["runs"]:
        assert [p["rate"] for p in run["points"]] == [3]
        for point, simulated in zip(run["points"], run["simulated"]):
            assert point["requests"] > 0 and 0.0 <= point["attainment"] <= 1.0
            assert point["memory_samples"]  # the agent's split, sampled each second
            assert simulated["rate"] == point["rate"] and simulated["requests"] == point["requests"]
            # Both sides' latency percentiles, so that the simulator's TPOT can be set against live.
            assert point["ttft_p50_s"] > 0 and simulated["tpot_p99_s"] > 0 and "tpot_p50_s" in simulated
    # One cluster, reset before every point but the first: its scheduler started with prism, then, after
    # the reset's idle, with time-share.
    log = (tmp_path / "state" / "prism" / "logs" / "scheduler.log").read_text()
    starts = [line for line in log.splitlines() if ", policy " in line]
    assert [("prism" if ", policy prism," in s else "time-share") for s in starts] == ["prism", "time-share"]
    assert capsys.readouterr().out.count("reset: every engine off") == 1
    assert not (tmp_path / "state" / "time-share").exists()
