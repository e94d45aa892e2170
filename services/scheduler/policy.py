"""Placement policies: pure functions from a cluster snapshot to the target
placement. The scheduler loop and the simulator call the same code.

A snapshot holds the agents and their GPUs (with memory), the configured
models with their weight sizes, each model's recent demand from the load
reports, and the current placement (what the agents run). A placement maps
each model to its replicas: an agent, the GPUs of one engine, and whether the
engine is active (weights and KV on the GPU) or inactive (weights in host
memory, switched back on by its first request, or by the scheduler).

Policies (`POLICIES`, chosen by `--policy`):
- `static`: the config's init_placements, never changed.
- `dedicated`: one model per GPU set, always active; models beyond the GPUs
  are not placed (what "a GPU per model" costs).
- `time-share`: every model placed, at most one active per GPU: the one with
  demand, the current one kept while it has demand (no flapping), the most
  demanded otherwise.
- `prism`: demand-aware sharing. Every model is placed (cold ones inactive,
  spread over GPUs, so their weights wait in host memory); models with demand
  are active, and as many share a GPU as their weights plus KV demand fit;
  a model with demand on a GPU too full for it gets a second replica on the
  GPU with the most room (make before break: its first replica goes once the
  new one is active), which also spreads bursty groups that become active
  together. Hysteresis: a model is cold only after its demand has been zero
  for the whole report window (60 s), placed models stay where they are
  unless their GPU is over-committed beyond a margin, and a move never takes
  a model off its only active replica.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from services.common.placement_config import ModelConfig


@dataclass(frozen=True)
class AgentView:
    agent_id: str
    gpu_ids: frozenset[int]
    gpu_memory: Mapping[int, int] = field(default_factory=dict)  # gpu id -> bytes; missing: unknown (0)

    def memory_of(self, gpu_id: int) -> int:
        return self.gpu_memory.get(gpu_id, 0)


@dataclass(frozen=True)
class ModelDemand:
    """One model's load, summed over the agents' latest reports."""

    arrival_rate: float = 0.0  # requests/s over the report window
    queued: int = 0
    running: int = 0
    kv_demand_bytes: int = 0  # KV its requests hold and will need soon

    @property
    def hot(self) -> bool:
        return self.arrival_rate > 0 or self.queued > 0 or self.running > 0

    def __add__(self, other: ModelDemand) -> ModelDemand:
        """Two sources' load on one model (two agents' reports, say), summed."""
        return ModelDemand(self.arrival_rate + other.arrival_rate, self.queued + other.queued,
                           self.running + other.running, self.kv_demand_bytes + other.kv_demand_bytes)


def with_waiting(demand: Mapping[str, ModelDemand], waiting: Mapping[str, int]) -> dict[str, ModelDemand]:
    """Demand plus the requests waiting at gateways for a model to become servable, counted as queued."""
    out = dict(demand)
    for model, count in waiting.items():
        out[model] = out.get(model, ModelDemand()) + ModelDemand(queued=count)
    return out


@dataclass(frozen=True)
class ReplicaTarget:
    agent_id: str
    gpu_ids: tuple[int, ...]
    active: bool
    memory_limit_bytes: int = 0


Placement = dict[str, list[ReplicaTarget]]  # model -> its replicas


@dataclass(frozen=True)
class ClusterSnapshot:
    models: tuple[ModelConfig, ...]
    agents: tuple[AgentView, ...]
    demand: Mapping[str, ModelDemand] = field(default_factory=dict)  # absent: no demand
    weight_bytes: Mapping[str, int] = field(default_factory=dict)  # model -> bytes (all its GPUs)
    current: Placement = field(default_factory=dict)  # what the agents run now (active as reported)

    def demand_of(self, model: str) -> ModelDemand:
        return self.demand.get(model, ModelDemand())


@dataclass(frozen=True)
class PolicyParams:
    # KV an active model is counted with at least, as a fraction of its GPU, so
    # a model with little demand still has room to take a burst.
    min_kv_fraction: float = 0.05
    # A GPU counts as over-committed (a hot model there gets a replica elsewhere)
    # only when its active models' needs exceed its memory by this fraction.
    overcommit_margin: float = 0.1


Policy = Callable[[ClusterSnapshot, PolicyParams], Placement]

GpuKey = tuple[str, tuple[int, ...]]  # (agent id, gpu ids of one engine)


# ---- the GPUs ------------------------------------------------------------------


def _gpu_sets(snapshot: ClusterSnapshot, size: int) -> list[GpuKey]:
    """Every way to give an engine `size` GPUs of one agent, as disjoint
    consecutive groups (tensor parallelism stays within an agent)."""
    out = []
    for agent in sorted(snapshot.agents, key=lambda a: a.agent_id):
        ids = sorted(agent.gpu_ids)
        for start in range(0, len(ids) - size + 1, size):
            out.append((agent.agent_id, tuple(ids[start:start + size])))
    return out


def _memory(snapshot: ClusterSnapshot, key: GpuKey) -> int:
    """The smallest memory among the set's GPUs (what each shard has)."""
    agent = next(a for a in snapshot.agents if a.agent_id == key[0])
    return min((agent.memory_of(g) for g in key[1]), default=0)


def _live_replicas(snapshot: ClusterSnapshot, model: ModelConfig) -> list[ReplicaTarget]:
    """Current replicas on live agents with GPUs that exist there and the model's tp size."""
    agents = {a.agent_id: a for a in snapshot.agents}
    return [r for r in snapshot.current.get(model.model_name, [])
            if r.agent_id in agents and set(r.gpu_ids) <= agents[r.agent_id].gpu_ids
            and len(r.gpu_ids) == model.tp_size]


def _overlaps(a: GpuKey, b: GpuKey) -> bool:
    return a[0] == b[0] and bool(set(a[1]) & set(b[1]))


# ---- static --------------------------------------------------------------------


def static_policy(snapshot: ClusterSnapshot, params: PolicyParams = PolicyParams()) -> Placement:
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


# ---- dedicated -----------------------------------------------------------------


def dedicated_policy(snapshot: ClusterSnapshot, params: PolicyParams = PolicyParams()) -> Placement:
    """One model per GPU set, always active. Models keep the GPUs they have;
    the others take free sets in order of priority (then name)."""
    placement: Placement = {m.model_name: [] for m in snapshot.models}
    taken: list[GpuKey] = []
    for model in snapshot.models:  # keep what runs
        for r in _live_replicas(snapshot, model)[:1]:
            key = (r.agent_id, r.gpu_ids)
            if not any(_overlaps(key, t) for t in taken):
                taken.append(key)
                placement[model.model_name] = [ReplicaTarget(r.agent_id, r.gpu_ids, True)]
    for model in sorted(snapshot.models, key=lambda m: (-m.priority, m.model_name)):
        if placement[model.model_name]:
            continue
        for key in _gpu_sets(snapshot, model.tp_size):
            if not any(_overlaps(key, t) for t in taken):
                taken.append(key)
                placement[model.model_name] = [ReplicaTarget(key[0], key[1], True)]
                break
    return placement


# ---- placing every model somewhere ---------------------------------------------


def _home_of_everyone(snapshot: ClusterSnapshot) -> dict[str, GpuKey]:
    """One GPU set per model: where it runs now (its active replica first),
    else the set whose models' weights (per GPU) weigh least, then the one
    with the fewest models: spreads the memory that models which become
    active together will need. The largest models are placed first."""
    homes: dict[str, GpuKey] = {}
    load: dict[GpuKey, tuple[int, int]] = {}  # set -> (weight bytes per GPU, models)

    def add(key: GpuKey, model: ModelConfig) -> None:
        weights, count = load.get(key, (0, 0))
        load[key] = (weights + snapshot.weight_bytes.get(model.model_name, 0) // model.tp_size, count + 1)

    for model in snapshot.models:
        replicas = sorted(_live_replicas(snapshot, model), key=lambda r: (not r.active, r.agent_id, r.gpu_ids))
        if replicas:
            homes[model.model_name] = (replicas[0].agent_id, replicas[0].gpu_ids)
            add(homes[model.model_name], model)
    unplaced = sorted((m for m in snapshot.models if m.model_name not in homes),
                      key=lambda m: (-snapshot.weight_bytes.get(m.model_name, 0), m.model_name))
    for model in unplaced:
        sets = _gpu_sets(snapshot, model.tp_size)
        if not sets:
            continue

        def burden(k: GpuKey) -> tuple[int, int, GpuKey]:
            overlapping = [v for s, v in load.items() if _overlaps(s, k)]
            return (sum(w for w, _ in overlapping), sum(n for _, n in overlapping), k)

        best = min(sets, key=burden)
        homes[model.model_name] = best
        add(best, model)
    return homes


# ---- time-share ----------------------------------------------------------------


def time_share_policy(snapshot: ClusterSnapshot, params: PolicyParams = PolicyParams()) -> Placement:
    homes = _home_of_everyone(snapshot)
    by_gpu: dict[GpuKey, list[ModelConfig]] = {}
    for model in snapshot.models:
        if model.model_name in homes:
            by_gpu.setdefault(homes[model.model_name], []).append(model)
    placement: Placement = {m.model_name: [] for m in snapshot.models}
    for key, models in by_gpu.items():
        hot = [m for m in models if snapshot.demand_of(m.model_name).hot]
        current = [m for m in hot if any(r.active for r in _live_replicas(snapshot, m))]
        if current:
            chosen = current[0].model_name  # the one on the GPU keeps it while it has demand
        elif hot:
            chosen = max(hot, key=lambda m: (snapshot.demand_of(m.model_name).arrival_rate, m.priority,
                                             m.model_name)).model_name
        else:
            chosen = None
        for m in models:
            placement[m.model_name] = [ReplicaTarget(key[0], key[1], m.model_name == chosen)]
    return placement


# ---- prism ---------------------------------------------------------------------


def _need_per_gpu(snapshot: ClusterSnapshot, model: ModelConfig, memory: int, params: PolicyParams) -> int:
    """Memory an active replica takes on each of its GPUs: its weight shard
    and its KV demand, at least a small share of the GPU."""
    demand = snapshot.demand_of(model.model_name)
    weights = snapshot.weight_bytes.get(model.model_name, 0)
    kv = max(demand.kv_demand_bytes, int(params.min_kv_fraction * memory * model.tp_size))
    return math.ceil((weights + kv) / model.tp_size)


def prism_policy(snapshot: ClusterSnapshot, params: PolicyParams = PolicyParams()) -> Placement:
    homes = _home_of_everyone(snapshot)
    models = {m.model_name: m for m in snapshot.models}
    placement: Placement = {name: [] for name in models}
    used: dict[GpuKey, int] = {}  # active needs per GPU set

    def room(key: GpuKey) -> int:
        memory = _memory(snapshot, key)
        return memory - sum(n for k, n in used.items() if _overlaps(k, key))

    def add(name: str, key: GpuKey, active: bool) -> None:
        placement[name].append(ReplicaTarget(key[0], key[1], active))
        if active:
            used[key] = used.get(key, 0) + _need_per_gpu(snapshot, models[name], _memory(snapshot, key), params)

    # Hot models in order: priority; then those already running at home (they keep their GPU, so
    # noise in the rates cannot make two models swap places); then demand; then name.
    def running_at_home(m: ModelConfig) -> bool:
        return any(r.active and (r.agent_id, r.gpu_ids) == homes[m.model_name] for r in _live_replicas(snapshot, m))

    def order(m: ModelConfig) -> tuple:
        settled = running_at_home(m)
        return (-m.priority, not settled, 0.0 if settled else -snapshot.demand_of(m.model_name).arrival_rate,
                m.model_name)

    hot = sorted((m for m in snapshot.models if snapshot.demand_of(m.model_name).hot and m.model_name in homes),
                 key=order)
    for model in hot:
        name = model.model_name
        home = homes[name]
        memory = _memory(snapshot, home)
        need = _need_per_gpu(snapshot, model, memory, params)
        live = _live_replicas(snapshot, model)
        elsewhere = [r for r in live if (r.agent_id, r.gpu_ids) != home]
        if need <= room(home) + params.overcommit_margin * memory or not memory:
            add(name, home, True)
            continue
        # Its GPU is too full: a replica on the set with the most room, made before the old one breaks.
        candidates = [k for k in _gpu_sets(snapshot, model.tp_size) if not _overlaps(k, home)]
        target = None
        for r in elsewhere:  # a second replica already exists: keep it
            target = (r.agent_id, r.gpu_ids)
        if target is None and candidates:
            best = max(candidates, key=lambda k: (room(k), k))
            if room(best) >= need:
                target = best
        if target is None:
            add(name, home, True)  # nowhere better: squeeze in (the agent's balloon shares the GPU)
            continue
        add(name, target, True)
        new_is_active = any(r.active and (r.agent_id, r.gpu_ids) == target for r in live)
        if not new_is_active:
            add(name, home, True)  # keep serving from home until the new replica is up
    # Cold models stay placed, inactive, where they are (or on the emptiest set).
    for model in snapshot.models:
        name = model.model_name
        if not placement[name] and name in homes:
            add(name, homes[name], False)
    return placement


# Policies whose target switches engines on and off (static leaves that to demand at the agents).
MANAGES_ACTIVITY = frozenset({"dedicated", "time-share", "prism"})

POLICIES: dict[str, Policy] = {
    "static": static_policy,
    "dedicated": dedicated_policy,
    "time-share": time_share_policy,
    "prism": prism_policy,
}
