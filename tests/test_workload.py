"""Traces: the bursty-group generator's statistics match its parameters, it is
deterministic for a seed, traces round-trip through their file, and the
Azure and BurstGPT loaders read sample files written here."""

from __future__ import annotations

import statistics
from collections import Counter

import pytest

from prism.workload.generator import BurstyGroupParams, bursty_group_trace
from prism.workload.loaders import load_azure, load_burstgpt
from prism.workload.trace import Trace


def test_rate_lengths_and_determinism():
    params = BurstyGroupParams(
        num_models=6,
        num_groups=2,
        active_groups=1,
        shift_s=50,
        rate=20,
        idle_fraction=0,
        burstiness_cv=1.0,
        prompt_mean=300,
        prompt_std=100,
        output_mean=80,
        output_std=20,
        duration_s=400,
        seed=1,
    )
    trace = bursty_group_trace(params)
    assert trace == bursty_group_trace(params)  # same seed, same trace
    assert trace != bursty_group_trace(BurstyGroupParams(**{**params.__dict__, "seed": 2}))
    assert len(trace.requests) == pytest.approx(20 * 400, rel=0.05)
    assert statistics.mean(r.prompt_tokens for r in trace.requests) == pytest.approx(300, rel=0.05)
    assert statistics.stdev(r.prompt_tokens for r in trace.requests) == pytest.approx(100, rel=0.1)
    assert statistics.mean(r.output_tokens for r in trace.requests) == pytest.approx(80, rel=0.05)
    assert all(0 <= r.t < 400 for r in trace.requests)
    assert [r.t for r in trace.requests] == sorted(r.t for r in trace.requests)


def test_groups_take_turns():
    params = BurstyGroupParams(
        num_models=6, num_groups=3, active_groups=1, shift_s=100, rate=10, idle_fraction=0, duration_s=1000, seed=4
    )
    trace = bursty_group_trace(params)
    groups = trace.metadata["groups"]
    for window in trace.metadata["windows"]:
        active = {m for g in window["active_groups"] for m in groups[g]}
        seen = {r.model for r in trace.requests if window["start"] <= r.t < window["start"] + 100}
        assert seen <= active and seen  # only the active group's models, with idle_fraction 0
    assert len({tuple(w["active_groups"]) for w in trace.metadata["windows"]}) > 1  # the active group changes


def test_zipf_popularity_within_the_active_models():
    params = BurstyGroupParams(
        num_models=4, num_groups=1, active_groups=1, rate=50, zipf_alpha=1.0, burstiness_cv=1.0, duration_s=400, seed=7
    )
    trace = bursty_group_trace(params)
    (group,) = trace.metadata["groups"]  # in rank order
    counts = Counter(r.model for r in trace.requests)
    for rank, model in enumerate(group, 1):
        assert counts[model] / counts[group[0]] == pytest.approx(1 / rank, rel=0.1)


def test_burstiness_sets_the_spread_of_inter_arrival_times():
    def cv_of(cv: float) -> float:
        params = BurstyGroupParams(
            num_models=1, num_groups=1, rate=20, burstiness_cv=cv, shift_s=10_000, duration_s=2000, seed=3
        )
        times = [r.t for r in bursty_group_trace(params).requests]
        gaps = [b - a for a, b in zip(times, times[1:])]
        return statistics.stdev(gaps) / statistics.mean(gaps)

    assert cv_of(1.0) == pytest.approx(1.0, rel=0.1)
    assert cv_of(3.0) == pytest.approx(3.0, rel=0.2)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="active_groups"):
        bursty_group_trace(BurstyGroupParams(num_models=4, num_groups=2, active_groups=3))
    with pytest.raises(ValueError, match="rate must be positive"):
        bursty_group_trace(BurstyGroupParams(rate=0))


def test_a_trace_round_trips_through_its_file_and_scales(tmp_path):
    trace = bursty_group_trace(BurstyGroupParams(num_models=3, num_groups=3, duration_s=30, seed=5))
    path = tmp_path / "trace.jsonl"
    trace.save(path)
    loaded = Trace.load(path)
    assert loaded == trace
    faster = loaded.scaled(0.5)
    assert faster.duration_s == pytest.approx(trace.duration_s / 2, abs=1e-5)
    path.write_text(path.read_text() + '{"t": "soon", "model": "m"}\n')
    with pytest.raises(ValueError, match=r"trace.jsonl:\d+: not a trace line"):
        Trace.load(path)


def test_azure_loader(tmp_path):
    path = tmp_path / "azure.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
        "2023-11-16 18:15:47.5330010,879,0\n"
    )
    trace = load_azure(path, ["a", "b"], assign="round-robin", time_scale=0.5)
    assert [round(r.t, 4) for r in trace.requests] == [0.0, round(0.852411 / 2, 4), round(4.314579 / 2, 4)]
    assert [(r.prompt_tokens, r.output_tokens) for r in trace.requests] == [(374, 44), (879, 1), (396, 109)]
    assert sorted(r.model for r in trace.requests) == ["a", "a", "b"]
    (tmp_path / "bad.csv").write_text("when,tokens\n1,2\n")
    with pytest.raises(ValueError, match="not an Azure LLM inference trace"):
        load_azure(tmp_path / "bad.csv", ["a"])


def test_burstgpt_loader_maps_its_models_and_drops_failures(tmp_path):
    path = tmp_path / "burstgpt.csv"
    path.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n"
        "45,ChatGPT,1087,230,1317,Conversation log\n"
        "118,GPT-4,417,276,693,Conversation log\n"
        "1106,ChatGPT,0,0,0,Conversation log\n"
    )
    trace = load_burstgpt(path, ["small", "large"])
    assert [(r.t, r.model, r.prompt_tokens, r.output_tokens) for r in trace.requests] == [
        (0.0, "small", 472, 18),
        (40.0, "small", 1087, 230),
        (113.0, "large", 417, 276),
    ]
    assert len(load_burstgpt(path, ["small", "large"], keep_failed=True).requests) == 4
    zipf = load_burstgpt(path, ["x", "y", "z"], assign="zipf", seed=1)
    assert {r.model for r in zipf.requests} <= {"x", "y", "z"}
    with pytest.raises(ValueError, match="'source' assignment needs"):
        load_azure(tmp_path / "burstgpt.csv", ["a"], assign="source")


def test_prism_trace_commands(tmp_path):
    from typer.testing import CliRunner

    from prism.cli import app

    runner = CliRunner()
    out = tmp_path / "g.jsonl"
    done = runner.invoke(
        app,
        [
            "trace",
            "generate",
            "-o",
            str(out),
            "--models",
            "a,b,c",
            "--num-groups",
            "3",
            "--duration-s",
            "20",
            "--seed",
            "9",
        ],
    )
    assert done.exit_code == 0, done.output
    trace = Trace.load(out)
    assert set(trace.models) <= {"a", "b", "c"} and trace.metadata["params"]["seed"] == 9
    source = tmp_path / "b.csv"
    source.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n7,GPT-4,10,20,30,API log\n"
    )
    done = runner.invoke(
        app,
        ["trace", "convert", str(source), "-o", str(tmp_path / "b.jsonl"), "--models", "x,y", "--time-scale", "0.5"],
    )
    assert done.exit_code == 0, done.output
    assert [(r.t, r.model) for r in Trace.load(tmp_path / "b.jsonl").requests] == [(0.0, "x"), (1.0, "y")]
    done = runner.invoke(app, ["trace", "generate", "-o", str(out), "--num-groups", "40"])
    assert done.exit_code == 2 and "num_groups" in done.output


def test_traces_that_differ_only_in_rate_share_their_groups_windows_and_scaled_arrivals():
    """A rate sweep (bench/one_gpu.py) changes nothing but the rate: the same groups and windows, and at
    twice the rate each model's arrivals in a window are the same gaps halved, with the same lengths first."""
    base = dict(num_models=6, num_groups=3, shift_s=10, idle_fraction=0.0, duration_s=30, seed=4)
    slow = bursty_group_trace(BurstyGroupParams(rate=4, **base))
    fast = bursty_group_trace(BurstyGroupParams(rate=8, **base))
    assert slow.metadata["groups"] == fast.metadata["groups"]
    assert slow.metadata["windows"] == fast.metadata["windows"]
    for model in slow.models:
        for window in range(3):
            start = 10.0 * window

            def of(trace):
                return [r for r in trace.requests if r.model == model and start <= r.t < start + 10]

            s, f = of(slow), of(fast)
            assert len(f) >= len(s)
            assert [round(start + (r.t - start) / 2, 4) for r in s] == [round(r.t, 4) for r in f[: len(s)]]
            assert [(r.prompt_tokens, r.output_tokens) for r in s] == [
                (r.prompt_tokens, r.output_tokens) for r in f[: len(s)]
            ]


def test_a_model_is_judged_by_its_own_slo_where_its_config_sets_one():
    from prism.workload.replay import SloTargets
    from services.common.placement_config import ModelConfig

    models = [
        ModelConfig("big", "/m", ttft_slo_ms=2000),
        ModelConfig("fast", "/m", tpot_slo_ms=50),
        ModelConfig("plain", "/m"),
    ]
    slo = SloTargets(ttft_s=1.0, tpot_s=0.1).with_models(models)
    assert slo.of("big") == (2.0, 0.1) and slo.of("fast") == (1.0, 0.05) and slo.of("plain") == (1.0, 0.1)
    assert slo.attained(1.5, 0.08, "big") and not slo.attained(1.5, 0.08, "plain")
    assert not slo.attained(0.5, 0.08, "fast") and slo.attained(0.5, 0.08, "plain")
    assert slo.attained(1.5, 0.08) is False  # no model: the defaults
