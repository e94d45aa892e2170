"""The `dedicated` policy: each model on GPU sets of its own, always active, as
many as its config lists placements (an operator provisions a hot model with
several); models beyond the GPUs are not placed (what "GPUs per model"
costs)."""

from __future__ import annotations

from services.common.placement_config import ModelConfig
from services.scheduler.policies.gpu_sets import gpu_sets, live_replicas, overlaps
from services.scheduler.policies.snapshot import ClusterSnapshot, GpuKey, Placement, PolicyParams, ReplicaTarget


def dedicated_policy(snapshot: ClusterSnapshot, params: PolicyParams = PolicyParams()) -> Placement:
    """Each model on GPU sets no other model uses, always active: one per
    placement its config lists (at least one; where, is this policy's
    choice), each on a distinct agent (an agent runs one engine per model).
    Models keep the GPUs they have; the others take free sets in order of
    priority (then name).

    Args:
        snapshot: the cluster as the scheduler sees it: agents and their GPUs, models, live replicas and
            each model's demand (policies/snapshot.py).
        params: the policies' knobs (PolicyParams: compute costs and bounds, warm rates, kvpr's tau);
            not read.

    Returns:
        The target placement: each model's replicas (agent, GPU ids, whether active).
    """
    placement: Placement = {m.model_name: [] for m in snapshot.models}
    taken: list[GpuKey] = []

    def wanted(model: ModelConfig) -> int:
        return max(1, len(model.init_placements))

    def take(model: ModelConfig, key: GpuKey) -> None:
        taken.append(key)
        placement[model.model_name].append(ReplicaTarget(key[0], key[1], True))

    def free_for(model: ModelConfig, key: GpuKey) -> bool:
        return not any(overlaps(key, t) for t in taken) and all(
            r.agent_id != key[0] for r in placement[model.model_name]
        )

    for model in snapshot.models:  # keep what runs
        for r in live_replicas(snapshot, model):
            if len(placement[model.model_name]) < wanted(model) and free_for(model, (r.agent_id, r.gpu_ids)):
                take(model, (r.agent_id, r.gpu_ids))
    for model in sorted(snapshot.models, key=lambda m: (-m.priority, m.model_name)):
        for key in gpu_sets(snapshot, model.tp_size):
            if len(placement[model.model_name]) >= wanted(model):
                break
            if free_for(model, key):
                take(model, key)
    return placement
