"""The `prism` policy: demand- and compute-aware sharing. Every model is
placed (cold ones inactive, spread over GPUs, so their weights wait in host
memory); models with demand are active, and as many share a GPU as both their
weights plus KV demand fit its memory and their compute loads fit its
compute (`compute_load`: the GPU time a model needs per second to keep its
TPOT SLO beside others, from its arrival rate, busy fraction and tokens per
request, priced by a step-cost profile). A model with demand on a GPU too
full for it (memory or compute) gets a second replica on the GPU with the
most compute room where it fits (make before break: its first replica goes
once the new one is active), which also spreads bursty groups that become
active together. A model whose compute needs more than one GPU (at its
window's rate, or its last 10 s's where that is higher, so that a burst
is served as it starts) gets that many replicas on distinct agents, each
taking an even share (the gateways round-robin over them), placed after
the models that fit one GPU, with hysteresis on their number. When the
GPUs are short, models are admitted in order of
requests per unit of compute and those that fit nowhere are put together on
the GPU(s) whose admitted models have the fewest requests, so the others
keep their SLOs instead of every GPU being overloaded; where that would
push a GPU's load past `compute_overload`, the model is shed: not placed
until a GPU has room (its requests wait at the gateways, then end with an
explicit error), since squeezed in it would cost everyone there their SLO
and itself keep none (simulated, 18 models on one H200: 21% of requests
within SLO, 2-3% when squeezing in). A model already serving is shed only
while the GPUs are short of compute in sum; otherwise it stays where it
runs, since on an agent with several GPUs it cannot move to another of
them (one engine per model an agent) and a shed serving model fails its
requests in flight. Hysteresis: a model
is cold only after its demand has been zero for the whole report window
(60 s), placed models stay where they are unless their GPU is
over-committed beyond a margin (memory or compute), and a move never takes
a model off its only active replica. Opt-in (`standby_replicas`): each
model on one GPU set also gets switched-off replicas on other agents, which
a burst switches on instead of loading new ones.
"""

from __future__ import annotations

import math

from services.common.placement_config import ModelConfig
from services.scheduler.policies.compute import compute_load
from services.scheduler.policies.gpu_sets import (
    gpu_sets,
    home_of_everyone,
    live_replicas,
    need_per_gpu,
    on_busiest_gpu,
    open_sets,
    overlaps,
    shard_memory,
)
from services.scheduler.policies.snapshot import ClusterSnapshot, GpuKey, Placement, PolicyParams, ReplicaTarget


def prism_policy(snapshot: ClusterSnapshot, params: PolicyParams = PolicyParams()) -> Placement:
    homes = home_of_everyone(snapshot)
    models = {m.model_name: m for m in snapshot.models}
    placement: Placement = {name: [] for name in models}
    used: dict[GpuKey, int] = {}  # active needs per GPU set
    compute: dict[GpuKey, float] = {}  # compute loads per GPU set
    protected: dict[GpuKey, float] = {}  # arrival rate of the models placed within compute, per GPU set
    sacrificed: list[GpuKey] = []  # sets given the models that fit nowhere
    shed: set[str] = set()  # hot models no set can take without costing others their SLO
    loads = {m.model_name: compute_load(snapshot, m, params) for m in snapshot.models}

    def burst_load(model: ModelConfig) -> float:
        """What the model's last seconds would need, where its recent rate is above the window's
        (replication only reads it)."""
        demand = snapshot.demand_of(model.model_name)
        if demand.recent_arrival_rate <= demand.arrival_rate:
            return loads[model.model_name]
        return compute_load(snapshot, model, params, rate=demand.recent_arrival_rate)

    burst_loads = {m.model_name: burst_load(m) for m in snapshot.models}

    def room(key: GpuKey) -> int:
        memory = shard_memory(snapshot, key)
        return memory - on_busiest_gpu(used, key)

    def compute_used(key: GpuKey) -> float:
        return on_busiest_gpu(compute, key)

    def protected_rate(key: GpuKey) -> float:
        return sum(r for k, r in protected.items() if overlaps(k, key))

    def add(name: str, key: GpuKey, active: bool, load: float = 0.0, replicas: int = 1) -> None:
        placement[name].append(ReplicaTarget(key[0], key[1], active))
        if active:
            used[key] = used.get(key, 0) + need_per_gpu(snapshot, models[name], shard_memory(snapshot, key), params,
                                                         replicas)
            compute[key] = compute.get(key, 0.0) + load

    def memory_fits(model: ModelConfig, key: GpuKey, replicas: int = 1) -> bool:
        memory = shard_memory(snapshot, key)
        need = need_per_gpu(snapshot, model, memory, params, replicas)
        return not memory or need <= room(key) + params.overcommit_margin * memory

    def fits(model: ModelConfig, key: GpuKey, staying: bool, replicas: int = 1) -> bool:
        """Memory and compute (a replica's share of the model's, with `replicas` serving it); a model
        already active there keeps it up to the margins. A replica of a model replicated for its load
        may fill a GPU with nothing else on it up to the overload bound: no one else's SLO is at stake."""
        limit = params.compute_capacity + (params.compute_margin if staying else 0.0)
        if replicas > 1 and not compute_used(key):
            limit = max(limit, params.compute_overload)
        return (memory_fits(model, key, replicas)
                and compute_used(key) + loads[model.model_name] / replicas <= limit)

    def replicas_wanted(model: ModelConfig, active: list[GpuKey]) -> int:
        """As many active replicas as the model's compute needs at `compute_capacity` each (the gateways
        split its requests evenly among them), with hysteresis so that a rate near a boundary does not
        add and drop a replica by turns: a lone replica is enough while it stays within capacity plus
        the margin (as a model staying on its GPU does), and a model replicated for its load keeps
        its replicas until one fewer would stay under capacity less the margin. (Two active replicas
        of a model whose load fits one are a move under way, made before break: not kept.) The load
        is the larger of the window's and the last seconds' (a burst is replicated as it starts)."""
        load = burst_loads[model.model_name]
        want = max(1, math.ceil(load / params.compute_capacity))
        have = len(active)
        if have <= 1 and load <= params.compute_capacity + params.compute_margin:
            want = 1
        if want >= 2 and have > want and load / (have - 1) > params.compute_capacity - params.compute_margin:
            want = have
        return min(want, len({k[0] for k in gpu_sets(snapshot, model.tp_size)}))

    # Hot models in order: priority; then those already running at home (they keep their GPU, so
    # noise in the rates cannot make two models swap places); then requests per unit of compute
    # (when GPUs are short, the most requests keep their SLO); then name.
    def running_at_home(m: ModelConfig) -> bool:
        return any(r.active and (r.agent_id, r.gpu_ids) == homes[m.model_name] for r in live_replicas(snapshot, m))

    def order(m: ModelConfig) -> tuple:
        settled = running_at_home(m)
        rate = snapshot.demand_of(m.model_name).arrival_rate
        efficiency = rate / loads[m.model_name] if loads[m.model_name] > 0 else rate
        return (-m.priority, not settled, 0.0 if settled else -efficiency, 0.0 if settled else -rate, m.model_name)

    def warm(m: ModelConfig) -> bool:
        demand = snapshot.demand_of(m.model_name)
        return demand.arrival_rate < params.warm_rate and not demand.queued

    def place_replicas(model: ModelConfig, want: int, live: list[ReplicaTarget], active: list[GpuKey],
                       loaded: list[GpuKey]) -> bool:
        """A model whose compute needs more than one GPU: up to `want` active replicas on distinct agents
        (its active ones first, then its loaded ones, then the sets with the most compute room), each
        taking an even share of its load. With fewer found, the ones found share it all; with none, False
        (it goes on as a model that fits nowhere)."""
        name = model.model_name
        chosen: list[GpuKey] = []
        taken: set[str] = set()

        def take(candidates: list[GpuKey], staying: bool) -> None:
            for key in candidates:
                if len(chosen) < want and key[0] not in taken and fits(model, key, staying, want):
                    chosen.append(key)
                    taken.add(key[0])

        take(sorted(active, key=lambda k: (compute_used(k), k)), staying=True)
        take(sorted((k for k in loaded if k not in active), key=lambda k: (compute_used(k), k)), staying=False)
        take(sorted((k for k in open_sets(snapshot, model, live) if k not in active and k not in loaded),
                    key=lambda k: (compute_used(k), -room(k), k)), staying=False)
        if not chosen:
            return False
        rate = snapshot.demand_of(name).arrival_rate
        for key in chosen:
            add(name, key, True, loads[name] / len(chosen), len(chosen))
            protected[key] = protected.get(key, 0.0) + rate / len(chosen)
        if active and not any(k in active for k in chosen):
            add(name, active[0], True)  # keep serving from where it is until the new replicas are up
        return True

    hot = sorted((m for m in snapshot.models if snapshot.demand_of(m.model_name).hot and m.model_name in homes),
                 key=order)
    overflow: list[ModelConfig] = []
    replicated: list[tuple[ModelConfig, int, list[ReplicaTarget], list[GpuKey], list[GpuKey]]] = []
    for model in (m for m in hot if not warm(m)):
        name = model.model_name
        home = homes[name]
        load = loads[name]
        rate = snapshot.demand_of(name).arrival_rate
        live = live_replicas(snapshot, model)
        active = [(r.agent_id, r.gpu_ids) for r in live if r.active]
        loaded = [(r.agent_id, r.gpu_ids) for r in live if not r.active]
        want = replicas_wanted(model, active)
        if want > 1:  # after the others: they keep their GPUs, it takes the room left
            replicated.append((model, want, live, active, loaded))
            continue
        # Stay: on an active replica (or home) that fits, the one with the most compute room.
        current = active + ([home] if home not in active else [])
        stay = [k for k in current if fits(model, k, staying=k in active)]
        if stay:
            key = max(stay, key=lambda k: (-compute_used(k), k in active, k))
            add(name, key, True, load)
            protected[key] = protected.get(key, 0.0) + rate
            continue
        # Move: a replica loaded elsewhere that fits, else the set with the most compute room where it
        # fits; made before the old one breaks.
        target = next((k for k in loaded if k not in current and fits(model, k, staying=False)), None)
        if target is None:
            candidates = [k for k in open_sets(snapshot, model, live) if k not in current and fits(model, k, False)]
            if candidates:
                target = max(candidates, key=lambda k: (-compute_used(k), room(k), k))
        if target is None:
            overflow.append(model)
            continue
        add(name, target, True, load)
        protected[target] = protected.get(target, 0.0) + rate
        if target not in active:
            add(name, current[0], True)  # keep serving from where it is until the new replica is up
    for model, want, live, active, loaded in replicated:
        if not place_replicas(model, want, live, active, loaded):
            overflow.append(model)
    # Shedding is triage for GPUs short of compute in sum. Where they have room in sum, a model that fits
    # nowhere it may go (an agent runs one engine per model, so it cannot move between one agent's GPUs)
    # and is active stays where it runs: shedding it would fail its requests in flight and unload its
    # engine, to load it again once it is cold (simulated, issue 9's 18 models on one agent of 8 GPUs,
    # seed 1: 74 loads, 57 unloads and 497 failed requests in 60 s).
    gpu_count = sum(len(a.gpu_ids) for a in snapshot.agents)
    short = sum(loads[m.model_name] * m.tp_size for m in hot) > params.compute_overload * gpu_count
    # What fits nowhere goes together where it costs the fewest requests their SLO: the sets whose
    # protected models have the least arrival rate (one already given such models first).
    for model in overflow:
        name = model.model_name
        home = homes[name]
        live = live_replicas(snapshot, model)
        active = [(r.agent_id, r.gpu_ids) for r in live if r.active]
        loaded = [(r.agent_id, r.gpu_ids) for r in live]
        current = active + ([home] if home not in active else [])
        candidates = [k for k in loaded + open_sets(snapshot, model, live) if memory_fits(model, k)]
        # Onto a set whose models were placed within its compute only while the
        # sum stays under the GPU's whole: past it, the squeeze would take their SLO too.
        candidates = [k for k in candidates
                      if not protected_rate(k) or compute_used(k) + loads[name] <= params.compute_overload]
        if not candidates and active and not short:
            candidates = active[:1]
        if not candidates:
            shed.add(name)  # not served until a set has room: its requests wait at the gateway, then fail
            continue
        key = min(candidates, key=lambda k: (not any(overlaps(k, s) for s in sacrificed), protected_rate(k),
                                            k not in active, k not in loaded, -room(k), k))
        sacrificed.append(key)
        add(name, key, True, loads[name])
        if key not in active and current[0] != key and (key not in loaded or current[0] in active):
            add(name, current[0], True)  # keep serving from where it is until the new replica is up
    # Warm models stay where they are (active there, else at home): on while the memory has room.
    for model in (m for m in hot if warm(m)):
        name = model.model_name
        live = live_replicas(snapshot, model)
        key = next(((r.agent_id, r.gpu_ids) for r in live if r.active), homes[model.model_name])
        on = memory_fits(model, key)
        add(name, key, on, loads[name] if on else 0.0)
    # Cold models stay placed, inactive, where they are (or on the emptiest set).
    for model in snapshot.models:
        name = model.model_name
        if not placement[name] and name in homes and name not in shed:
            add(name, homes[name], False)
    # Standbys only while every hot model fits within its GPUs' compute: where GPUs are short, the
    # replicas the policy switches on for a burst push in beside models that already share a GPU
    # (simulated, 200 models on 32 GPUs: 80.8% of requests within SLO with a standby each in every
    # plan, 89.7% with standbys only in the plans where everything fits).
    if params.standby_replicas and not overflow:
        _add_standby_replicas(snapshot, placement, params.standby_replicas)
    return placement


def _add_standby_replicas(snapshot: ClusterSnapshot, placement: Placement, count: int) -> None:
    """Gives each model placed on one GPU set `count` switched-off replicas on
    other agents: the ones it has there already (switched off or on), else the
    sets whose agents hold the least weight of the models placed on them, so
    the host memory the standbys take is spread. A replicated model (placed on
    several sets) needs none: a move under way, or its replicas all serve."""
    weight_on: dict[str, int] = {}  # agent -> weight bytes of the engines placed there
    for name, replicas in placement.items():
        for r in replicas:
            weight_on[r.agent_id] = weight_on.get(r.agent_id, 0) + snapshot.weight_bytes.get(name, 0)
    for model in snapshot.models:
        name = model.model_name
        if len(placement[name]) != 1:
            continue
        live = live_replicas(snapshot, model)
        kept = [(r.agent_id, r.gpu_ids) for r in live if r.agent_id != placement[name][0].agent_id]
        sets = kept + sorted(open_sets(snapshot, model, live + placement[name]),
                             key=lambda k: (weight_on.get(k[0], 0), k))
        for key in sets:
            if len(placement[name]) > count:
                break
            if all(r.agent_id != key[0] for r in placement[name]):
                placement[name].append(ReplicaTarget(key[0], key[1], False))
                weight_on[key[0]] = weight_on.get(key[0], 0) + snapshot.weight_bytes.get(name, 0)
