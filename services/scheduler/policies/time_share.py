"""The `time-share` policy: every model placed, at most one active per GPU: the
one with demand, the current one kept while it has demand (no flapping), the
most demanded otherwise."""

from __future__ import annotations

from services.common.placement_config import ModelConfig
from services.scheduler.policies.gpu_sets import home_of_everyone, live_replicas
from services.scheduler.policies.snapshot import ClusterSnapshot, GpuKey, Placement, PolicyParams, ReplicaTarget


def time_share_policy(snapshot: ClusterSnapshot, params: PolicyParams = PolicyParams()) -> Placement:
    """At most one active model per GPU: the one on it keeps it while it has demand, else the hot model
    of the highest arrival rate; every other model of the GPU placed there, switched off.

    Args:
        snapshot: the cluster as the scheduler sees it: agents and their GPUs, models, live replicas and
            each model's demand (policies/snapshot.py).
        params: the policies' knobs (PolicyParams: compute costs and bounds, warm rates, kvpr's tau);
            not read.

    Returns:
        The target placement: each model's replicas (agent, GPU ids, whether active).
    """
    homes = home_of_everyone(snapshot)
    by_gpu: dict[GpuKey, list[ModelConfig]] = {}
    for model in snapshot.models:
        if model.model_name in homes:
            by_gpu.setdefault(homes[model.model_name], []).append(model)
    placement: Placement = {m.model_name: [] for m in snapshot.models}
    for key, models in by_gpu.items():
        hot = [m for m in models if snapshot.demand_of(m.model_name).hot]
        current = [m for m in hot if any(r.active for r in live_replicas(snapshot, m))]
        if current:
            chosen = current[0].model_name  # the one on the GPU keeps it while it has demand
        elif hot:
            chosen = max(
                hot, key=lambda m: (snapshot.demand_of(m.model_name).arrival_rate, m.priority, m.model_name)
            ).model_name
        else:
            chosen = None
        for m in models:
            placement[m.model_name] = [ReplicaTarget(key[0], key[1], m.model_name == chosen)]
    return placement
