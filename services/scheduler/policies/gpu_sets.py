"""The GPUs as the policies see them, shared by the policies: the GPU sets an
engine can take (tensor parallelism stays within an agent), their memory, a
model's live replicas, and a home for every model (`home_of_everyone`)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TypeVar

from services.common.placement_config import ModelConfig
from services.scheduler.policies.snapshot import ClusterSnapshot, GpuKey, PolicyParams, ReplicaTarget

# What a GPU set puts on each of its GPUs: bytes or model counts (int), compute load (float).
PerGpu = TypeVar("PerGpu", int, float)


def gpu_sets(snapshot: ClusterSnapshot, size: int) -> list[GpuKey]:
    """Every way to give an engine `size` GPUs of one agent, as disjoint
    consecutive groups (tensor parallelism stays within an agent)."""
    out = []
    for agent in sorted(snapshot.agents, key=lambda a: a.agent_id):
        ids = sorted(agent.gpu_ids)
        for start in range(0, len(ids) - size + 1, size):
            out.append((agent.agent_id, tuple(ids[start : start + size])))
    return out


def shard_memory(snapshot: ClusterSnapshot, key: GpuKey) -> int:
    """The smallest memory among the set's GPUs (what each shard has)."""
    agent = next(a for a in snapshot.agents if a.agent_id == key[0])
    return min((agent.memory_of(g) for g in key[1]), default=0)


def live_replicas(snapshot: ClusterSnapshot, model: ModelConfig) -> list[ReplicaTarget]:
    """Current replicas on live agents with GPUs that exist there and the model's tp size."""
    agents = {a.agent_id: a for a in snapshot.agents}
    return [
        r
        for r in snapshot.current.get(model.model_name, [])
        if r.agent_id in agents and set(r.gpu_ids) <= agents[r.agent_id].gpu_ids and len(r.gpu_ids) == model.tp_size
    ]


def overlaps(a: GpuKey, b: GpuKey) -> bool:
    return a[0] == b[0] and bool(set(a[1]) & set(b[1]))


def on_busiest_gpu(per_gpu_of_set: Mapping[GpuKey, PerGpu], key: GpuKey) -> PerGpu:
    """The most that any one GPU of `key` carries, given what each GPU set puts on
    each of its GPUs (memory or compute per GPU): a set of several GPUs (tensor
    parallelism) has room where its fullest GPU has, not where the sum of its GPUs does."""
    agent, gpus = key
    return max(
        (sum(v for (a, ids), v in per_gpu_of_set.items() if a == agent and gpu in ids) for gpu in gpus), default=0
    )


def home_of_everyone(snapshot: ClusterSnapshot) -> dict[str, GpuKey]:
    """One GPU set per model: where it runs now (its active replica first),
    else the set whose fullest GPU has the fewest models, then whose models'
    weights (per GPU) weigh least: spreads the models, and so the compute of
    those that become active together, then their memory. The largest
    models are placed first. (Weights first piled the small models of issue
    9's mix onto the GPUs a 70B split did not cover, where a model cannot
    leave its GPU if one agent has them all: simulated, 18 models on one
    agent of 8 H200s, seeds 0/1/2, time-share attained 99.9/66.0/86.8%,
    97.8/98.7/99.7% now; bench/multi_gpu_simulated.py.)"""
    homes: dict[str, GpuKey] = {}
    load: dict[GpuKey, tuple[int, int]] = {}  # set -> (weight bytes per GPU, models)

    def add(key: GpuKey, model: ModelConfig) -> None:
        weights, count = load.get(key, (0, 0))
        load[key] = (weights + snapshot.weight_bytes.get(model.model_name, 0) // model.tp_size, count + 1)

    for model in snapshot.models:
        replicas = sorted(live_replicas(snapshot, model), key=lambda r: (not r.active, r.agent_id, r.gpu_ids))
        if replicas:
            homes[model.model_name] = (replicas[0].agent_id, replicas[0].gpu_ids)
            add(homes[model.model_name], model)
    unplaced = sorted(
        (m for m in snapshot.models if m.model_name not in homes),
        key=lambda m: (-snapshot.weight_bytes.get(m.model_name, 0), m.model_name),
    )
    for model in unplaced:
        sets = gpu_sets(snapshot, model.tp_size)
        if not sets:
            continue

        def burden(k: GpuKey) -> tuple[int, int, GpuKey]:
            overlapping = [v for s, v in load.items() if overlaps(s, k)]
            models_on_fullest = on_busiest_gpu({s: n for s, (_, n) in load.items()}, k)
            return (models_on_fullest, sum(w for w, _ in overlapping), k)

        best = min(sets, key=burden)
        homes[model.model_name] = best
        add(best, model)
    return homes


def need_per_gpu(
    snapshot: ClusterSnapshot, model: ModelConfig, memory: int, params: PolicyParams, replicas: int = 1
) -> int:
    """Memory an active replica takes on each of its GPUs: its weight shard
    and its share of the KV demand (of `replicas` serving it), at least a
    small share of the GPU."""
    demand = snapshot.demand_of(model.model_name)
    weights = snapshot.weight_bytes.get(model.model_name, 0)
    kv = max(demand.kv_demand_bytes // replicas, int(params.min_kv_fraction * memory * model.tp_size))
    return math.ceil((weights + kv) / model.tp_size)


def open_sets(snapshot: ClusterSnapshot, model: ModelConfig, live: list[ReplicaTarget]) -> list[GpuKey]:
    """Sets a new replica of the model can go to: on agents that do not run it
    yet (an agent runs one engine per model, so a model moves between agents,
    not between the GPUs of one)."""
    hosting = {r.agent_id for r in live}
    return [k for k in gpu_sets(snapshot, model.tp_size) if k[0] not in hosting]
