"""The cluster's numbers where operators look: the gateway's /metrics with
every agent's gauges, `prism status` and `prism top --once`, on the real
local cluster (the session's `cluster` fixture: etcd, scheduler, one agent
with real engines serving tiny-llama and tiny-qwen2 on the CPU, gateway)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from prism.cluster_view import ClusterSnapshot, gpu_lines, memory_bar, model_lines
from prism_client.v1 import agent_pb2
from tests.interruptible import interruptible_python
from tests.prometheus_text import metric_values

REPO = Path(__file__).resolve().parent.parent
MODELS = ("tiny-llama", "tiny-qwen2")


def scrape(cluster) -> dict[str, float]:
    response = httpx.get(cluster.http_url + "/metrics", timeout=10)
    assert response.status_code == 200
    return metric_values(response.text)


@pytest.fixture(scope="module")
def served(cluster) -> None:
    """A request for each model, so each has an arrival in its serving numbers."""
    for model in MODELS:
        response = httpx.post(
            cluster.http_url + "/v1/completions",
            timeout=60,
            json={"model": model, "prompt": "Hello", "max_tokens": 3, "temperature": 0, "ignore_eos": True},
        )
        assert response.status_code == 200, response.text


def test_metrics_expose_the_agents_gauges_for_loaded_models(cluster, served):
    samples = scrape(cluster)
    agents = [re.search(r'agent="([^"]+)"', name).group(1) for name in samples if name.startswith("prism_agent_up{")]
    assert len(agents) == 1
    agent = agents[0]
    assert samples[f'prism_agent_up{{agent="{agent}"}}'] == 1
    gpu = f'agent="{agent}",gpu="0"'
    assert samples[f"prism_agent_gpu_total_bytes{{{gpu}}}"] == 2 << 30  # the fixture's --cpu-memory-gb 2
    assert samples[f"prism_agent_gpu_kv_limit_bytes{{{gpu}}}"] <= samples[f"prism_agent_gpu_kv_budget_bytes{{{gpu}}}"]
    for model in MODELS:
        engine = f'agent="{agent}",gpu="0",model="{model}"'
        assert samples[f'prism_agent_engine_state{{{engine},state="active"}}'] == 1
        # How it serves: the CPU's page pool, torch attention, no CUDA graphs (never a silent path).
        assert (
            samples[
                f'prism_agent_engine_serving_path{{agent="{agent}",attention="torch",cuda_graphs="off",'
                f'gpu="0",kv_pool="pages",model="{model}"}}'
            ]
            == 1
        )  # (the exposition sorts labels)
        assert samples[f"prism_agent_engine_weight_bytes{{{engine}}}"] > 0
        assert samples[f"prism_agent_engine_kv_limit_bytes{{{engine}}}"] > 0
        assert samples[f"prism_agent_model_arrival_rate{{{engine}}}"] > 0
        # The agent books a request as finished before it sends the last response.
        assert samples[f"prism_agent_model_finished_requests{{{engine}}}"] >= 1
        assert samples[f'prism_agent_model_ttft_seconds{{{engine},quantile="0.99"}}'] > 0
        assert samples[f'prism_agent_model_tpot_seconds{{{engine},quantile="0.5"}}'] > 0
        assert 0 <= samples[f"prism_agent_model_slo_attainment{{{engine}}}"] <= 1


def run_cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "prism.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_status_shows_the_memory_split_and_model_numbers(cluster, served):
    out = run_cli("status", "--etcd", cluster.etcd_endpoint)
    # The local cluster's one replica, named "scheduler" (its --scheduler-id), leads.
    assert f"scheduler: scheduler at {cluster.scheduler_address} leads" in out
    assert re.search(r"leads; \d+ plan\(s\) by scheduler, the last [\d.]+ s ago", out), out.splitlines()[0]
    gpus = out[out.index("gpus:") : out.index("models:")]
    assert re.search(r"gpu 0 \(cpu, 2\.0 GB\)\s+\[#*[AB.#r]+\]", gpus), gpus
    for model in MODELS:
        assert re.search(rf"[AB] {model}\s+active\s+weights", gpus), gpus
    models = out[out.index("models:") :]
    assert "TTFT p50/p99 ms" in models
    for model in MODELS:
        line = next(line for line in models.splitlines() if line.strip().startswith(model))
        row = line.split()
        assert row[3] == "active" and row[4] == "0", row  # state, queued
        assert "pages/torch" in row, row  # how it serves: the page pool, torch attention, no CUDA graphs
        assert float(row[6]) > 0, row  # its arrival rate (REQ/S)
        assert row[-1].endswith("KB") or row[-1].endswith("MB"), row  # KV used/limit
        # The prefix cache's hit rate and what it keeps (or "-" before a prompt was admitted), then KV used/limit.
        assert re.search(r" (\d+%/[\d.]+[KMG]?B|-) +[\d.]+ [KMG]?B/", line), line
    # The step costs the scheduler prices compute with: on a CPU cluster, the constants (no CPU steps
    # are fitted in unless the scheduler is told --step-costs-from all).
    costs = out[out.index("step costs") :]
    assert "decode ms" in costs and "GB/s" in costs, costs
    assert costs.count("profile") == 2 and "measured" not in costs, costs


def test_top_once_prints_one_frame(cluster, served):
    out = run_cli("top", "--once", "--etcd", cluster.etcd_endpoint)
    assert "\x1b[" not in out  # one frame for a pipe: no screen control
    assert out.startswith("prism top") and "1 agent(s)" in out
    assert re.search(r"gpu 0 \(cpu, 2\.0 GB\)\s+\[", out)
    for model in MODELS:
        assert re.search(rf"^\s+{model}\s+\S+\s+0\s+active\s", out, re.MULTILINE), out


def test_status_json_carries_each_agents_status(cluster, served):
    import json

    state = json.loads(run_cli("status", "--etcd", cluster.etcd_endpoint, "--json"))
    (status,) = state["agent_status"].values()
    assert {e["model"] for e in status["engines"]} >= set(MODELS)
    assert status["gpus"][0]["total_bytes"] == str(2 << 30)  # int64 is a string in proto JSON


# ---- rendering on its own ------------------------------------------------------


def test_memory_bar_keeps_small_parts_visible_and_its_width():
    gpu = agent_pb2.GpuMemory(
        gpu_id=0,
        total_bytes=1000,
        weight_bytes=400,
        reserve_bytes=0,
        kv_budget_bytes=600,
        engines=[
            agent_pb2.EngineMemory(model="a", kv_limit_bytes=200),
            agent_pb2.EngineMemory(model="b", kv_limit_bytes=1),
        ],
    )
    assert memory_bar(gpu, width=10) == "[####AAB...]"
    full = agent_pb2.GpuMemory(total_bytes=10, weight_bytes=9, engines=[agent_pb2.EngineMemory(kv_limit_bytes=9)])
    assert memory_bar(full, width=10) == "[#########A]"  # over-full (rounding) is cut to the width


def test_an_agent_without_status_is_shown_not_skipped():
    from prism.cluster_view import AgentView

    snapshot = ClusterSnapshot(agents=[AgentView({"agent_id": "a1", "address": "x"}, None, "no status (UNAVAILABLE)")])
    assert gpu_lines(snapshot) == ["a1: no status (UNAVAILABLE)"]
    assert model_lines(snapshot) == ["no engines"]


def test_top_refreshes_until_ctrl_c(cluster):
    proc = subprocess.Popen(
        [*interruptible_python("prism.cli"), "top", "--etcd", cluster.etcd_endpoint, "--interval", "0.2"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        frames = 0
        while frames < 2:  # a second frame: it refreshes
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            frames += "prism top" in line
        assert "\x1b[H\x1b[2J" in line  # each frame clears the screen first
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0 and err == ""  # no traceback
