"""Two agents under the `prism` policy, as real processes: kill -9 the agent
that hosts a model and, once its etcd lease has expired, its models are
placed on the other agent and served there. (Where the models go first
depends on which agent registered first: the policy does not move placed
models to spread them.)"""

from __future__ import annotations

import time

import grpc
import httpx
import pytest

from prism.cluster import LocalCluster
from prism_client.v1 import agent_pb2, agent_pb2_grpc
from tests.prism_clusters import prism_cluster as start_prism_cluster

GUARD_S = 90


@pytest.fixture(scope="module")
def two_agents(tmp_path_factory):
    with start_prism_cluster(tmp_path_factory.mktemp("two-agents"), agents=2) as cluster:
        yield cluster


def models_on(address: str) -> set[str]:
    try:
        with grpc.insecure_channel(address) as channel:
            status = agent_pb2_grpc.AgentStub(channel).GetStatus(agent_pb2.GetStatusRequest(), timeout=5)
    except grpc.RpcError:
        return set()
    return {
        e.model for e in status.engines if e.state in (agent_pb2.ENGINE_STATE_ACTIVE, agent_pb2.ENGINE_STATE_INACTIVE)
    }


def complete(cluster: LocalCluster, model: str) -> httpx.Response:
    return httpx.post(
        cluster.http_url + "/v1/completions",
        timeout=GUARD_S,
        json={"model": model, "prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True},
    )


def test_a_killed_agents_model_is_placed_on_the_other_agent_and_served(two_agents):
    cluster = two_agents
    deadline = time.monotonic() + GUARD_S
    while True:
        placed = {name: models_on(address) for name, address in cluster.agent_addresses.items()}
        if sum(len(m) for m in placed.values()) == 2:
            break
        assert time.monotonic() < deadline, f"models not placed: {placed}"
        time.sleep(0.2)
    victim = next(name for name, models in placed.items() if "tiny-llama" in models)
    survivor = next(name for name in placed if name != victim)
    moving = placed[victim]
    for model in ("tiny-llama", "tiny-qwen2"):
        assert complete(cluster, model).status_code == 200

    cluster.kill(victim)
    killed_at = time.monotonic()
    while not moving <= models_on(cluster.agent_addresses[survivor]):
        assert time.monotonic() < killed_at + GUARD_S, f"{sorted(moving)} not placed again on {survivor}"
        time.sleep(0.2)
    replaced_s = time.monotonic() - killed_at
    for model in ("tiny-llama", "tiny-qwen2"):
        response = complete(cluster, model)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 4
    print(
        f"{sorted(moving)} loaded on the surviving agent {replaced_s:.1f}s after theirs was killed "
        "(the agent lease is 5 s)"
    )
