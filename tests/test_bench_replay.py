"""`prism bench` against the live CPU cluster (the session's `cluster`
fixture: two tiny models): a short generated trace is replayed open-loop
through the REST API and through the gRPC gateway; every request completes
and the results JSON holds per-request and summary numbers."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from prism.cli import app
from prism.workload.generator import BurstyGroupParams, bursty_group_trace

MODELS = ["tiny-llama", "tiny-qwen2"]


def test_bench_replays_a_trace_and_writes_its_results(cluster, tmp_path):
    trace = bursty_group_trace(
        BurstyGroupParams(
            num_models=2,
            num_groups=2,
            shift_s=2,
            rate=8,
            duration_s=4,
            prompt_mean=20,
            prompt_std=5,
            output_mean=6,
            output_std=2,
            max_prompt=60,
            max_output=12,
            seed=2,
        ),
        MODELS,
    )
    path = tmp_path / "trace.jsonl"
    trace.save(path)
    runner = CliRunner()
    for api_args in (["--url", cluster.http_url], ["--grpc", cluster.gateway_grpc]):
        out = tmp_path / "result.json"
        done = runner.invoke(
            app, ["bench", str(path), *api_args, "--out", str(out), "--ttft-ms", "60000", "--tpot-ms", "60000"]
        )
        assert done.exit_code == 0, done.output
        result = json.loads(out.read_text())
        overall = result["overall"]
        assert overall["requests"] == len(trace.requests) > 10
        assert overall["succeeded"] == overall["requests"] and overall["errors"] == {}
        assert overall["slo_attainment"] == 1.0  # generous targets: every request attains
        assert set(result["per_model"]) <= set(MODELS)
        for r in result["requests"]:
            assert r["ttft_s"] is not None and 0 < r["ttft_s"] <= r["e2e_s"]
        grpc_tokens = [r["tokens"] for r in result["requests"]]
    # Through gRPC every response carries a token: exactly the trace's output lengths.
    assert grpc_tokens == [r.output_tokens for r in trace.requests]
    assert "SLO attainment 100.0%" in done.output
