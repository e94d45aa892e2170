"""Requests waiting at gateways for a model no agent serves yet (demand/
records in etcd) count as queued demand in the scheduler's snapshot, so the
policies bring such a model on: the merge, on records as a gateway writes
them, and its effect on the time-share and prism policies (pure functions;
test_cold_start_cluster.py has the whole path with real processes)."""

from __future__ import annotations

from services.common import placement_config as pc
from services.common import records
from services.scheduler.policies import (
    AgentView,
    ClusterSnapshot,
    ModelDemand,
    ReplicaTarget,
    prism_policy,
    time_share_policy,
    with_waiting,
)
from services.scheduler.server import waiting_at_gateways

GB = 1 << 30


def demand_record(model: str, gateway: str, waiting: int) -> bytes:
    return records.DemandRecord(model=model, gateway_id=gateway, waiting=waiting, since=1.0).to_json()


def test_waiting_requests_are_summed_over_gateways_and_unreadable_records_skipped():
    values = [
        demand_record("a", "g1", 2),
        demand_record("a", "g2", 3),
        demand_record("b", "g1", 1),
        b"not json",
        b'{"model": "c"}',
    ]
    assert waiting_at_gateways(values) == {"a": 5, "b": 1}
    assert records.demand_key("a", "g1") == records.DEMAND + "a/g1"


def test_waiting_requests_add_to_the_reports_queue_and_keep_the_rest():
    reported = {"a": ModelDemand(arrival_rate=2.0, queued=1, running=3, kv_demand_bytes=7)}
    merged = with_waiting(reported, {"a": 4, "b": 2})
    assert merged == {
        "a": ModelDemand(arrival_rate=2.0, queued=5, running=3, kv_demand_bytes=7),
        "b": ModelDemand(queued=2),
    }
    assert merged["b"].hot
    assert reported["a"].queued == 1  # the reports' numbers are not changed in place


def two_models_on_one_gpu(demand: dict[str, ModelDemand]) -> ClusterSnapshot:
    models = pc.parse(
        [{"model_name": n, "model_path": f"/m/{n}", "init_placements": [{"gpu_ids": [0]}]} for n in ("a", "b")]
    ).models
    current = {"a": [ReplicaTarget("x", (0,), False)], "b": [ReplicaTarget("x", (0,), False)]}
    return ClusterSnapshot(
        models=models,
        agents=(AgentView("x", frozenset({0}), {0: 80 * GB}),),
        demand=demand,
        weight_bytes={"a": GB, "b": GB},
        current=current,
    )


def test_a_model_with_requests_waiting_at_a_gateway_is_switched_on():
    idle = two_models_on_one_gpu({})
    waiting = two_models_on_one_gpu(with_waiting({}, waiting_at_gateways([demand_record("b", "g1", 1)])))
    for policy in (time_share_policy, prism_policy):
        assert not any(r.active for rs in policy(idle).values() for r in rs)
        target = policy(waiting)
        assert [r.active for r in target["b"]] == [True], policy.__name__
        assert not any(r.active for r in target["a"])
