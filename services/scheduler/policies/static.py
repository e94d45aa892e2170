"""The `static` policy: the config's init_placements, never changed."""

from __future__ import annotations

from services.scheduler.policies.snapshot import ClusterSnapshot, Placement, PolicyParams, ReplicaTarget


def static_policy(snapshot: ClusterSnapshot, params: PolicyParams = PolicyParams()) -> Placement:
    """Each init placement goes to the first agent (by id) that has its GPU
    ids and does not host that model yet; agents that are missing simply
    leave the placement unassigned until one joins.

    Args:
        snapshot: the cluster as the scheduler sees it: agents and their GPUs, models, live replicas and
            each model's demand (policies/snapshot.py).
        params: the policies' knobs (PolicyParams: compute costs and bounds, warm rates, kvpr's tau);
            not read: the config says it all.

    Returns:
        The target placement: each model's replicas (agent, GPU ids, whether active).
    """
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
