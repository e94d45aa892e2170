"""Cold start on a real local cluster (etcd, scheduler with the `prism`
policy, one agent, gateway as processes; two tiny models on a CPU device):
with the agent gone, no engine serves tiny-llama anywhere; a request for it
waits at the gateway, which publishes the demand in etcd; the agent comes
back, the scheduler - seeing the waiting request - loads tiny-llama switched
on (tiny-qwen2, without demand, switched off), and the request is served,
its wait in its TTFT and in the gateway's metrics."""

from __future__ import annotations

import json
import re
import signal
import threading
import time

import httpx
import pytest
from test_gateway_support import EtcdWriter

from prism.cluster import LocalCluster
from services.common import records
from tests.prism_clusters import prism_cluster as start_prism_cluster
from tests.prism_clusters import until
from tests.prometheus_text import metric_values

GUARD_S = 60.0  # hang guard: the agent restarts and loads both models well within it


@pytest.fixture(scope="module")
def prism_cluster(tmp_path_factory):
    with start_prism_cluster(tmp_path_factory.mktemp("cold-start")) as cluster:
        yield cluster


def available(cluster: LocalCluster) -> dict[str, bool]:
    listed = httpx.get(cluster.http_url + "/v1/models", timeout=5).json()["data"]
    return {m["id"]: m["available"] for m in listed}


def test_a_request_for_a_model_served_nowhere_waits_and_the_scheduler_brings_it_on(prism_cluster):
    cluster = prism_cluster
    etcd = EtcdWriter(cluster.etcd_endpoint)
    agent = cluster.processes["agent"]
    agent.send_signal(signal.SIGTERM)  # a clean stop revokes its lease: its engines leave etcd at once
    agent.wait(30)
    until(lambda: available(cluster) == {"tiny-llama": False, "tiny-qwen2": False}, "the engines to go", GUARD_S)

    first_event: list[float] = []
    outcome: dict = {}

    def request() -> None:
        sent = time.monotonic()
        with httpx.stream(
            "POST",
            cluster.http_url + "/v1/completions",
            timeout=GUARD_S,
            json={
                "model": "tiny-llama",
                "prompt": "Hello",
                "max_tokens": 4,
                "temperature": 0,
                "ignore_eos": True,
                "stream": True,
            },
        ) as response:
            outcome["status"] = response.status_code
            lines = []
            for line in response.iter_lines():
                if not line:
                    continue  # between events
                if not first_event:
                    first_event.append(time.monotonic() - sent)
                lines.append(line)
            outcome["lines"] = lines

    thread = threading.Thread(target=request, daemon=True)
    thread.start()
    demand = until(lambda: etcd.get_prefix(records.DEMAND + "tiny-llama/"), "the gateway's demand record", GUARD_S)
    seen = time.monotonic()
    (record,) = [records.DemandRecord.from_json(v) for v in demand.values()]
    assert record.model == "tiny-llama" and record.waiting == 1
    assert thread.is_alive()  # waiting, not failed

    restarted = time.monotonic()
    cluster.restart_agent()
    thread.join(GUARD_S)
    assert not thread.is_alive(), "the request did not finish"
    assert outcome["status"] == 200, outcome
    assert outcome["lines"][-1] == "data: [DONE]"
    pieces = [json.loads(line[6:]) for line in outcome["lines"] if line.startswith("data: {")]
    assert "error" not in pieces[-1] and sum(1 for p in pieces if p["choices"] and p["choices"][0]["text"]) >= 1
    until(lambda: not etcd.get_prefix(records.DEMAND + "tiny-llama/"), "the demand record to go", GUARD_S)

    # The scheduler saw the demand: it loaded the requested model switched on and the other one off.
    log = (cluster.log_dir / "scheduler.log").read_text()
    loads = dict(re.findall(r"loaded (tiny-\w+) on \S+ \((ENGINE_STATE_\w+)\)", log))  # the last load of each
    assert loads == {"tiny-llama": "ENGINE_STATE_ACTIVE", "tiny-qwen2": "ENGINE_STATE_INACTIVE"}, log

    samples = metric_values(httpx.get(cluster.http_url + "/metrics", timeout=10).text)
    assert samples['prism_gateway_cold_start_wait_seconds_count{model="tiny-llama",outcome="served"}'] == 1
    waited = samples['prism_gateway_cold_start_wait_seconds_sum{model="tiny-llama",outcome="served"}']
    assert waited >= restarted - seen  # it arrived before `seen`; nothing could serve it before the restart
    ttft = samples['prism_gateway_time_to_first_token_seconds_sum{api="completions",model="tiny-llama"}']
    assert samples['prism_gateway_time_to_first_token_seconds_count{api="completions",model="tiny-llama"}'] == 1
    assert ttft >= waited  # the TTFT counts from arrival, the wait included
    assert first_event[0] >= waited  # and the client saw it too
