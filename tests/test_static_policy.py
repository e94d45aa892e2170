from __future__ import annotations

from services.common import placement_config as pc
from services.common.records import EngineRecord
from services.scheduler.actions import Action, plan_actions
from services.scheduler.policies import AgentView, ClusterSnapshot, ReplicaTarget, static_policy

CONFIG = pc.parse(
    [
        {
            "model_name": "a",
            "model_path": "/m/a",
            "init_placements": [{"gpu_ids": [0], "on": True, "max_memory_pool_size": 1}],
        },
        {"model_name": "b", "model_path": "/m/b", "init_placements": [{"gpu_ids": [1], "on": False}]},
        {"model_name": "c", "model_path": "/m/c", "init_placements": [{"gpu_ids": [0]}, {"gpu_ids": [0]}]},
    ]
)


def snapshot(*agents: AgentView) -> ClusterSnapshot:
    return ClusterSnapshot(models=CONFIG.models, agents=agents)


def test_static_places_each_init_placement_on_an_agent_with_those_gpus():
    target = static_policy(snapshot(AgentView("x", frozenset({0})), AgentView("y", frozenset({0, 1}))))
    assert target["a"] == [ReplicaTarget("x", (0,), True, pc.GB)]
    assert target["b"] == [ReplicaTarget("y", (1,), False, 0)]
    # Two replicas of one model never share an agent.
    assert [r.agent_id for r in target["c"]] == ["x", "y"]


def test_static_leaves_models_unplaced_without_agents():
    assert static_policy(snapshot()) == {"a": [], "b": [], "c": []}


def test_plan_loads_missing_reloads_failed_and_unloads_unwanted():
    target = static_policy(snapshot(AgentView("x", frozenset({0, 1}))))
    engines = {
        ("x", "a"): EngineRecord("x", "a", "active", [0]),
        ("x", "b"): EngineRecord("x", "b", "failed", [1], error="boom"),
        ("x", "old"): EngineRecord("x", "old", "active", [0]),
        ("gone", "a"): EngineRecord("gone", "a", "active", [0]),
    }
    actions = plan_actions(target, engines, live_agents={"x"})
    assert actions == [
        Action("unload", "x", "old"),
        Action("load", "x", "b", (1,), False, 0),
        Action("load", "x", "c", (0,), True, 0),
    ]


def test_plan_is_empty_when_agents_run_the_target():
    target = static_policy(snapshot(AgentView("x", frozenset({0, 1}))))
    engines = {("x", m): EngineRecord("x", m, "active", list(r[0].gpu_ids)) for m, r in target.items()}
    assert plan_actions(target, engines, live_agents={"x"}) == []
