"""The `prism` placement policy driving a real local cluster (etcd, scheduler,
agent, gateway as processes; two tiny models on a CPU device): models nobody
asks for wait switched off, in host memory; the first request for one is
served (its agent switches it on), and the scheduler, seeing the demand in
the load reports, keeps it on while the other stays off."""

from __future__ import annotations

import asyncio
import time

import grpc
import httpx
import pytest

from prism.cluster import LocalCluster
from prism_client.v1 import agent_pb2, agent_pb2_grpc
from services.common import records
from services.common.etcd import connect
from tests.prism_clusters import prism_cluster as start_prism_cluster

GUARD_S = 60


@pytest.fixture(scope="module")
def prism_cluster(tmp_path_factory):
    # The scheduler's status record after every plan: the tests count plans instead of sleeping.
    with start_prism_cluster(
        tmp_path_factory.mktemp("prism-policy"), scheduler_args=("--status-interval-s", "0")
    ) as cluster:
        yield cluster


def scheduler_plans(cluster: LocalCluster) -> int:
    """The plans the leading scheduler has made, from its status record in etcd."""

    async def read() -> int:
        client = await connect(cluster.etcd_endpoint, timeout_s=5)
        try:
            got = await client.get(records.SCHEDULER_STATUS.encode())
            return records.SchedulerStatusRecord.from_json(got.value).plans if got is not None else 0
        finally:
            await client.close()

    return asyncio.run(read())


def engine_states(cluster: LocalCluster) -> dict[str, str]:
    with grpc.insecure_channel(cluster.agent_address) as channel:
        status = agent_pb2_grpc.AgentStub(channel).GetStatus(agent_pb2.GetStatusRequest(), timeout=5)
    return {e.model: agent_pb2.EngineState.Name(e.state) for e in status.engines}


def wait_for_states(cluster: LocalCluster, wanted: dict[str, str]) -> None:
    deadline = time.monotonic() + GUARD_S
    while (states := engine_states(cluster)) != wanted:
        assert time.monotonic() < deadline, f"engines are {states}, waited for {wanted}"
        time.sleep(0.1)


def test_cold_models_wait_switched_off_and_a_requested_one_is_served_and_kept_on(prism_cluster):
    cluster = prism_cluster
    off, on = "ENGINE_STATE_INACTIVE", "ENGINE_STATE_ACTIVE"
    wait_for_states(cluster, {"tiny-llama": off, "tiny-qwen2": off})  # no demand: both off the device
    response = httpx.post(
        cluster.http_url + "/v1/completions",
        timeout=GUARD_S,
        json={"model": "tiny-llama", "prompt": "Hello", "max_tokens": 4, "temperature": 0, "ignore_eos": True},
    )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 4
    wait_for_states(cluster, {"tiny-llama": on, "tiny-qwen2": off})
    # Several re-plans later (every 0.5 s), with the demand in the reports, nothing has flipped.
    after = scheduler_plans(cluster) + 4
    deadline = time.monotonic() + GUARD_S
    while scheduler_plans(cluster) < after:
        assert time.monotonic() < deadline, f"the scheduler made no {after}th plan in {GUARD_S}s"
        time.sleep(0.1)
    assert engine_states(cluster) == {"tiny-llama": on, "tiny-qwen2": off}
    log = (cluster.log_dir / "scheduler.log").read_text()
    assert "policy prism" in log
    assert "deactivated tiny-llama" not in log
