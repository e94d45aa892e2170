"""Placement policies: pure functions from a cluster snapshot to the target
placement. The scheduler loop and (later) the simulator call the same code.

Only `static` exists so far: the config's init_placements, never changed.
The demand-aware policies arrive with the global-scheduler issue and take
the same snapshot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.placement_config import ModelConfig


@dataclass(frozen=True)
class AgentView:
    agent_id: str
    gpu_ids: frozenset[int]


@dataclass(frozen=True)
class ReplicaTarget:
    agent_id: str
    gpu_ids: tuple[int, ...]
    active: bool
    memory_limit_bytes: int = 0


@dataclass(frozen=True)
class ClusterSnapshot:
    models: tuple[ModelConfig, ...]
    agents: tuple[AgentView, ...]
    # model -> requests/s seen in load reports; unused by `static`.
    demand: dict[str, float] = field(default_factory=dict)


Placement = dict[str, list[ReplicaTarget]]  # model -> its replicas


def static_policy(snapshot: ClusterSnapshot) -> Placement:
    """Each init placement goes to the first agent (by id) that has its GPU
    ids and does not host that model yet; agents that are missing simply
    leave the placement unassigned until one joins."""
    agents = sorted(snapshot.agents, key=lambda a: a.agent_id)
    placement: Placement = {}
    for model in snapshot.models:
        replicas: list[ReplicaTarget] = []
        for init in model.init_placements:
            for agent in agents:
                if set(init.gpu_ids) <= agent.gpu_ids and all(r.agent_id != agent.agent_id for r in replicas):
                    replicas.append(ReplicaTarget(agent.agent_id, init.gpu_ids, init.on, init.memory_limit_bytes))
                    break
        placement[model.model_name] = replicas
    return placement


POLICIES: dict[str, Callable[[ClusterSnapshot], Placement]] = {"static": static_policy}
