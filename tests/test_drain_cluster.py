"""A replica removed while it streams loses no request, on a real cluster
(etcd, scheduler, two agents, gateway as processes; a tiny model on each
agent's CPU device, static policy): clients keep streams going through the
gateway while the scheduler is restarted with a config that keeps one replica
instead of two. The removed replica drains (the agent logs it with requests
in flight), every stream completes whole, new ones go to the other replica,
and the removed engine is gone afterwards."""

from __future__ import annotations

import json
import signal
import threading
import time

import grpc
import httpx
import pytest

from prism.cluster import LocalCluster
from prism.tiny_models import ensure_default_models
from prism_client.v1 import agent_pb2, agent_pb2_grpc
from services.common.etcd_server import free_port

MODEL = "tiny-llama"
TOKENS = 48
STREAMERS = 4
GUARD_S = 120


def write_config(cluster_state, path: str, replicas: int):
    config = {
        "policy": "static",
        "models": [
            {"model_name": MODEL, "model_path": path, "init_placements": [{"gpu_ids": [0], "on": True}] * replicas}
        ],
    }
    (cluster_state / "models.json").write_text(json.dumps(config))
    return cluster_state / "models.json"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("drain-cluster")
    path = str(ensure_default_models(state / "models")[MODEL])
    cluster = LocalCluster(
        state_dir=state,
        config_path=write_config(state, path, replicas=2),
        http_port=free_port(),
        grpc_port=free_port(),
        device="cpu",
        cpu_memory_gb=1.0,
        engine_isolation="inline",
        agents=2,
        scheduler_args=("--replan-interval-s", "0.5"),
    )
    cluster.start()
    cluster.model_path = path
    yield cluster
    cluster.stop()


def serving(cluster: LocalCluster) -> dict[str, str]:
    """agent name -> the model's engine state there (agents without it left out)."""
    out = {}
    for name, address in cluster.agent_addresses.items():
        with grpc.insecure_channel(address) as channel:
            status = agent_pb2_grpc.AgentStub(channel).GetStatus(agent_pb2.GetStatusRequest(), timeout=5)
        for e in status.engines:
            if e.model == MODEL:
                out[name] = agent_pb2.EngineState.Name(e.state)
    return out


class Streamers:
    """Threads that keep streaming completions through the gateway, checking each one ends whole."""

    def __init__(self, cluster: LocalCluster):
        self.cluster = cluster
        self.stop = threading.Event()
        self.completed = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(STREAMERS)]

    def _one(self, client: httpx.Client, i: int) -> None:
        body = {
            "model": MODEL,
            "prompt": f"Stream {i}",
            "max_tokens": TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        finish, usage, done = None, None, False
        with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise AssertionError(f"status {response.status_code}: {response.read()[:300]!r}")
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    done = True
                    continue
                event = json.loads(data)
                if "error" in event:
                    raise AssertionError(f"error event: {event['error']}")
                finish = next((c["finish_reason"] for c in event.get("choices", []) if c.get("finish_reason")), finish)
                usage = event.get("usage") or usage
        if not (done and finish == "length" and usage and usage["completion_tokens"] == TOKENS):
            raise AssertionError(f"stream ended short: done={done} finish={finish} usage={usage}")

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.cluster.http_url, timeout=GUARD_S) as client:
            n = 0
            while not self.stop.is_set():
                n += 1
                try:
                    self._one(client, i * 1000 + n)
                except Exception as exc:  # noqa: BLE001 - every way a stream can fail is a failure here
                    with self.lock:
                        self.failures.append(f"streamer {i} #{n}: {exc}")
                else:
                    with self.lock:
                        self.completed += 1

    def __enter__(self) -> Streamers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(GUARD_S)


def drains_logged(cluster: LocalCluster) -> dict[str, str]:
    out = {}
    for name in cluster.agent_addresses:
        lines = [
            line
            for line in (cluster.log_dir / f"{name}.log").read_text(errors="replace").splitlines()
            if f"draining {MODEL}:" in line
        ]
        if lines:
            out[name] = lines[0]
    return out


def test_a_replica_removed_while_it_streams_loses_no_request(cluster):
    deadline = time.monotonic() + GUARD_S
    while serving(cluster) != {name: "ENGINE_STATE_ACTIVE" for name in cluster.agent_addresses}:
        assert time.monotonic() < deadline, f"two active replicas expected, found {serving(cluster)}"
        time.sleep(0.2)
    with Streamers(cluster) as streams:
        while streams.completed < 2 * STREAMERS:  # streams going on both replicas (round robin)
            assert time.monotonic() < deadline and not streams.failures, streams.failures
            time.sleep(0.05)
        scheduler = cluster.processes["scheduler"]
        scheduler.send_signal(signal.SIGTERM)
        scheduler.wait(30)
        write_config(cluster.state_dir, cluster.model_path, replicas=1)
        cluster.spawn_scheduler("scheduler")
        while len(serving(cluster)) != 1:
            assert time.monotonic() < deadline, f"one replica expected, found {serving(cluster)}"
            time.sleep(0.1)
        at_removal = streams.completed
        while streams.completed < at_removal + 2 * STREAMERS:  # new streams go to the replica that stays
            assert time.monotonic() < deadline, "streams stopped completing after the removal"
            time.sleep(0.05)
    assert streams.failures == []
    kept = serving(cluster)
    assert list(kept.values()) == ["ENGINE_STATE_ACTIVE"]
    drained = drains_logged(cluster)
    assert list(drained) == [name for name in cluster.agent_addresses if name not in kept], drained
    assert "request(s) in flight" in next(iter(drained.values()))
    removed = next(iter(drained))
    assert f"drained {MODEL}" in (cluster.log_dir / f"{removed}.log").read_text(errors="replace")
    assert "draining " + MODEL in (cluster.log_dir / "scheduler.log").read_text(errors="replace")
