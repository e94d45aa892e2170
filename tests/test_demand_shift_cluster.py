"""A shift of demand between two groups of models changes what runs where,
on a real cluster under the `prism` policy: two agents (one CPU device
each), four tiny models in two groups. The scheduler counts every active
model with at least 60% of a device (--min-kv-fraction 0.6), so two hot
models cannot share one; agents report a model idle 3 s after its last
request (--stats-window-s 3). While group 1 is busy its two models run on
different agents and group 2's are off; then group 2 takes over: its two
models run on different agents and group 1's are switched off."""

from __future__ import annotations

import json
import threading
import time

import grpc
import httpx
import pytest

from prism.cluster import LocalCluster
from prism.tiny_models import write_tiny_model
from prism_client.v1 import agent_pb2, agent_pb2_grpc
from services.common.etcd_server import free_port

GROUP_1, GROUP_2 = ("g1-a", "g1-b"), ("g2-a", "g2-b")
GUARD_S = 90


@pytest.fixture(scope="module")
def shifting(tmp_path_factory):
    state = tmp_path_factory.mktemp("demand-shift")
    models = []
    for seed, name in enumerate((*GROUP_1, *GROUP_2)):
        path = write_tiny_model(state / "models" / name, arch="llama", seed=seed)
        models.append({"model_name": name, "model_path": str(path), "init_placements": [{"gpu_ids": [0]}]})
    config = state / "models.json"
    config.write_text(json.dumps({"policy": "prism", "models": models}))
    cluster = LocalCluster(
        state_dir=state,
        config_path=config,
        http_port=free_port(),
        grpc_port=free_port(),
        device="cpu",
        cpu_memory_gb=1.0,
        engine_isolation="inline",
        agents=2,
        agent_args=("--stats-window-s", "3", "--busy-window-s", "2"),
        scheduler_args=("--replan-interval-s", "0.5", "--min-kv-fraction", "0.6"),
    )
    cluster.start()
    yield cluster
    cluster.stop()


def active_where(cluster: LocalCluster) -> dict[str, set[str]]:
    """model -> the agents on which it is active."""
    out: dict[str, set[str]] = {}
    for name, address in cluster.agent_addresses.items():
        with grpc.insecure_channel(address) as channel:
            status = agent_pb2_grpc.AgentStub(channel).GetStatus(agent_pb2.GetStatusRequest(), timeout=5)
        for e in status.engines:
            if e.state == agent_pb2.ENGINE_STATE_ACTIVE:
                out.setdefault(e.model, set()).add(name)
    return out


class Load:
    """Keeps requests going to some models from a background thread."""

    def __init__(self, cluster: LocalCluster, models: tuple[str, ...]):
        self.cluster, self.models = cluster, models
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.cluster.http_url, timeout=GUARD_S) as client:
            while not self.stop.is_set():
                for model in self.models:
                    r = client.post(
                        "/v1/completions",
                        json={"model": model, "prompt": "Hi", "max_tokens": 2, "temperature": 0, "ignore_eos": True},
                    )
                    if r.status_code != 200:
                        self.failures.append(f"{model}: {r.status_code} {r.text[:200]}")
                time.sleep(0.1)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(GUARD_S)


def wait_until(cluster: LocalCluster, check, what: str) -> dict[str, set[str]]:
    deadline = time.monotonic() + GUARD_S
    while True:
        where = active_where(cluster)
        if check(where):
            return where
        assert time.monotonic() < deadline, f"timed out waiting for {what}; active: {where}"
        time.sleep(0.25)


def spread_and_alone(group: tuple[str, ...], others: tuple[str, ...]):
    def check(where: dict[str, set[str]]) -> bool:
        placed = [where.get(m, set()) for m in group]
        return all(len(p) == 1 for p in placed) and placed[0] != placed[1] and not any(where.get(m) for m in others)

    return check


def test_a_shift_of_demand_between_groups_changes_colocation(shifting):
    cluster = shifting
    with Load(cluster, GROUP_1) as load_1:
        wait_until(cluster, spread_and_alone(GROUP_1, GROUP_2), "group 1 on different agents, group 2 off")
    with Load(cluster, GROUP_2) as load_2:
        wait_until(cluster, spread_and_alone(GROUP_2, GROUP_1), "group 2 on different agents, group 1 off")
    assert load_1.failures == [] and load_2.failures == []
