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
- `dedicated`: each model on GPU sets of its own, always active, as many as
  its config lists placements (an operator provisions a hot model with
  several); models beyond the GPUs are not placed (what "GPUs per model"
  costs).
- `time-share`: every model placed, at most one active per GPU: the one with
  demand, the current one kept while it has demand (no flapping), the most
  demanded otherwise.
- `prism`: demand- and compute-aware sharing. Every model is placed (cold
  ones inactive, spread over GPUs, so their weights wait in host memory);
  models with demand are active, and as many share a GPU as both their
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
    # Fraction of the report window with at least one request in flight, summed over
    # the reports (two busy replicas: up to 2).
    busy_fraction: float = 0.0
    mean_prompt_tokens: float = 0.0  # per finished request; 0: not known
    mean_output_tokens: float = 0.0
    # Requests/s over the last 10 s: a burst shows here within seconds, where the window's rate
    # takes most of a minute. Only replication reads it (prism_policy): a model whose burst needs
    # more than one GPU gets its replicas as the burst starts; everything else plans on the window.
    recent_arrival_rate: float = 0.0

    @property
    def hot(self) -> bool:
        return self.arrival_rate > 0 or self.queued > 0 or self.running > 0

    @classmethod
    def from_serving(cls, serving, *, queued: int, running: int, kv_demand_bytes: int) -> ModelDemand:
        """One engine's load: `serving` is its request stats, a ServingStats proto (a load report) or
        the ServingSnapshot it mirrors (the simulator), which name their fields alike."""
        return cls(arrival_rate=serving.arrival_rate, recent_arrival_rate=serving.recent_arrival_rate,
                   queued=queued, running=running, kv_demand_bytes=kv_demand_bytes,
                   busy_fraction=serving.busy_fraction, mean_prompt_tokens=serving.mean_prompt_tokens,
                   mean_output_tokens=serving.mean_output_tokens)

    def __add__(self, other: ModelDemand) -> ModelDemand:
        """Two sources' load on one model (two agents' reports, say): counts and
        rates summed, mean tokens per request averaged weighted by arrival rate."""
        def mean(a: float, b: float) -> float:
            if not a or not b:
                return a or b
            rates = self.arrival_rate + other.arrival_rate
            return (a * self.arrival_rate + b * other.arrival_rate) / rates if rates > 0 else (a + b) / 2

        return ModelDemand(self.arrival_rate + other.arrival_rate, self.queued + other.queued,
                           self.running + other.running, self.kv_demand_bytes + other.kv_demand_bytes,
                           self.busy_fraction + other.busy_fraction,
                           mean(self.mean_prompt_tokens, other.mean_prompt_tokens),
                           mean(self.mean_output_tokens, other.mean_output_tokens),
                           self.recent_arrival_rate + other.recent_arrival_rate)


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
    # model -> KV bytes per token (all layers, K and V); missing: estimated from its weight bytes
    kv_bytes_per_token: Mapping[str, int] = field(default_factory=dict)

    def demand_of(self, model: str) -> ModelDemand:
        return self.demand.get(model, ModelDemand())


@dataclass(frozen=True)
class StepCost:
    """The engine step-time constants of one model size (as the simulator's profile has them)."""

    weight_bytes: int
    decode_base_s: float  # a decode step's fixed cost
    decode_per_seq_s: float  # each decoding sequence, beyond its attention
    prefill_base_s: float  # a step with prefill tokens, beyond a decode step's base
    prefill_per_token_s: float
    prefill_per_seq_s: float = 0.0  # each prompt in a prefill step


@dataclass(frozen=True)
class ComputeCosts:
    """What an engine step costs on the cluster's GPUs, by model size (linear
    in weight bytes between the sizes, the smallest's below them, the last
    slope above), and decode attention's KV read rate."""

    points: tuple[StepCost, ...]  # ascending weight bytes
    attention_bytes_per_s: float

    def at(self, weight_bytes: int, name: str) -> float:
        return by_weight(self.points, weight_bytes, name)


def by_weight(points: tuple, weight_bytes: int, name: str) -> float:
    """Field `name` of points (ascending weight_bytes) at weight_bytes: linear
    between the two points around it, the first's value below them, the last
    two's slope above; never negative."""
    if len(points) == 1 or weight_bytes <= points[0].weight_bytes:
        return getattr(points[0], name)
    lo, hi = points[-2], points[-1]
    for a, b in zip(points, points[1:]):
        if weight_bytes <= b.weight_bytes:
            lo, hi = a, b
            break
    x = (weight_bytes - lo.weight_bytes) / (hi.weight_bytes - lo.weight_bytes)
    return max(0.0, getattr(lo, name) + x * (getattr(hi, name) - getattr(lo, name)))


# The H200 fit in bench/results/sim-profile-h200.json (Llama 3.2 1B and 3.1 8B, bf16,
# the built-in engine), rounded; a cluster of other GPUs passes its own (the
# simulator passes its profile's: LatencyProfile.compute_costs()).
H200_COMPUTE_COSTS = ComputeCosts(
    points=(StepCost(2_471_628_800, 1.48e-3, 3.79e-5, 1.149e-2, 1.328e-5),
            StepCost(16_060_522_496, 5.07e-3, 4.13e-5, 1.671e-2, 2.227e-5)),
    attention_bytes_per_s=4.61e12)


@dataclass(frozen=True)
class PolicyParams:
    # KV an active model is counted with at least, as a fraction of its GPU, so
    # a model with little demand still has room to take a burst.
    min_kv_fraction: float = 0.05
    # A GPU counts as over-committed (a hot model there gets a replica elsewhere)
    # only when its active models' needs exceed its memory by this fraction.
    overcommit_margin: float = 0.1
    # Compute (prism): step costs, and the load (GPU time per second, 1.0 = the
    # whole GPU) that active models may sum to on one GPU; a model already
    # active there stays until its GPU's load exceeds capacity plus the margin.
    compute: ComputeCosts = H200_COMPUTE_COSTS
    compute_capacity: float = 0.5
    compute_margin: float = 0.15
    # When GPUs are short, a model that fits nowhere within capacity still goes beside
    # others while their GPU's load stays under this; past it, it is not served (shed)
    # until a GPU has room, so the models there keep their SLO.
    compute_overload: float = 0.8
    # The round of steps over a GPU's busy engines must stay within this fraction
    # of each model's TPOT SLO.
    cycle_fraction: float = 0.5
    # An engine step's token budget (the engine's chunked prefill: services/gpu_agent/engine/scheduler.py).
    step_tokens: int = 512
    # Models with demand below this rate (requests/s) are warm rather than hot: they stay where they are,
    # active while their GPU has the memory, else switched off (their agent switches them on for a
    # request), and never move or push others away.
    warm_rate: float = 0.5
    # Tokens per request when the reports have none yet.
    default_prompt_tokens: float = 512.0
    default_output_tokens: float = 128.0
    # KV bytes per token per weight byte, for a model whose KV geometry is not in the snapshot.
    kv_bytes_per_weight_byte: float = 1.2e-5
    # Standby replicas (prism): this many more engines of each placed model that runs one, switched
    # off, on other agents. They cost their agents' host memory (the weights) and no GPU memory; when
    # a burst needs replicas, the policy switches them on (its loaded replicas come before new sets),
    # an activation (tenths of a second) instead of a load (seconds). The gateways send requests to
    # them only while no replica is active. 0: none (the agents' host memory is not in the snapshot,
    # so this is the operator's call).
    standby_replicas: int = 0


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


def _on_busiest_gpu(per_gpu_of_set: Mapping[GpuKey, float], key: GpuKey) -> float:
    """The most that any one GPU of `key` carries, given what each GPU set puts on
    each of its GPUs (memory or compute per GPU): a set of several GPUs (tensor
    parallelism) has room where its fullest GPU has, not where the sum of its GPUs does."""
    agent, gpus = key
    return max((sum(v for (a, ids), v in per_gpu_of_set.items() if a == agent and gpu in ids) for gpu in gpus),
               default=0)


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
    """Each model on GPU sets no other model uses, always active: one per
    placement its config lists (at least one; where, is this policy's
    choice), each on a distinct agent (an agent runs one engine per model).
    Models keep the GPUs they have; the others take free sets in order of
    priority (then name)."""
    placement: Placement = {m.model_name: [] for m in snapshot.models}
    taken: list[GpuKey] = []

    def wanted(model: ModelConfig) -> int:
        return max(1, len(model.init_placements))

    def take(model: ModelConfig, key: GpuKey) -> None:
        taken.append(key)
        placement[model.model_name].append(ReplicaTarget(key[0], key[1], True))

    def free_for(model: ModelConfig, key: GpuKey) -> bool:
        return (not any(_overlaps(key, t) for t in taken)
                and all(r.agent_id != key[0] for r in placement[model.model_name]))

    for model in snapshot.models:  # keep what runs
        for r in _live_replicas(snapshot, model):
            if len(placement[model.model_name]) < wanted(model) and free_for(model, (r.agent_id, r.gpu_ids)):
                take(model, (r.agent_id, r.gpu_ids))
    for model in sorted(snapshot.models, key=lambda m: (-m.priority, m.model_name)):
        for key in _gpu_sets(snapshot, model.tp_size):
            if len(placement[model.model_name]) >= wanted(model):
                break
            if free_for(model, key):
                take(model, key)
    return placement


# ---- placing every model somewhere ---------------------------------------------


def _home_of_everyone(snapshot: ClusterSnapshot) -> dict[str, GpuKey]:
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
            models_on_fullest = _on_busiest_gpu({s: n for s, (_, n) in load.items()}, k)
            return (models_on_fullest, sum(w for w, _ in overlapping), k)

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


def _need_per_gpu(snapshot: ClusterSnapshot, model: ModelConfig, memory: int, params: PolicyParams,
                  replicas: int = 1) -> int:
    """Memory an active replica takes on each of its GPUs: its weight shard
    and its share of the KV demand (of `replicas` serving it), at least a
    small share of the GPU."""
    demand = snapshot.demand_of(model.model_name)
    weights = snapshot.weight_bytes.get(model.model_name, 0)
    kv = max(demand.kv_demand_bytes // replicas, int(params.min_kv_fraction * memory * model.tp_size))
    return math.ceil((weights + kv) / model.tp_size)


def _open_sets(snapshot: ClusterSnapshot, model: ModelConfig, live: list[ReplicaTarget]) -> list[GpuKey]:
    """Sets a new replica of the model can go to: on agents that do not run it
    yet (an agent runs one engine per model, so a model moves between agents,
    not between the GPUs of one)."""
    hosting = {r.agent_id for r in live}
    return [k for k in _gpu_sets(snapshot, model.tp_size) if k[0] not in hosting]


DEFAULT_TPOT_S = 0.1  # the agent's default TPOT SLO (services/gpu_agent/slo.py)


def compute_load(snapshot: ClusterSnapshot, model: ModelConfig, params: PolicyParams,
                 rate: float | None = None) -> float:
    """The share of one GPU's time (each of its GPUs, for tensor parallelism)
    that the model needs to keep its TPOT SLO while it shares the GPU.

    Colocated engines run their steps one at a time, so a GPU's busy engines
    take turns in a round whose length is every step summed; a decoding
    request gets one token per round, so the round must stay within the TPOT
    SLO (times `cycle_fraction`, for bursts): the cycle C. Per second, a model
    then costs its fixed step cost once per round while it has requests in
    flight (busy), a prefill step's extra base per new request (at most once
    per round), and per-token work for its prompts and outputs:

        load = busy * decode_base / C + min(rate, 1/C) * prefill_base
               + rate * (prompt * prefill_per_token + output * (decode_per_seq + context * kv_per_token / attention_rate))

    busy is the measured busy fraction, capped by what the rate implies at
    the cycle (1 - exp(-rate * T), T a request's time in flight: its output
    at one token per round), since a model that waited behind others looks
    busier than it would be; prompt and output are the reported means
    (defaults until a request finished). The loads of models on one GPU add
    up: they fit while the sum stays under `compute_capacity`. rate: in place
    of the reported arrival rate."""
    demand = snapshot.demand_of(model.model_name)
    rate = demand.arrival_rate if rate is None else rate
    weights = snapshot.weight_bytes.get(model.model_name, 0)
    costs = params.compute
    cycle = params.cycle_fraction * ((model.tpot_slo_ms / 1000) if model.tpot_slo_ms else DEFAULT_TPOT_S)
    prompt = demand.mean_prompt_tokens or params.default_prompt_tokens
    output = demand.mean_output_tokens or params.default_output_tokens
    kv_per_token = snapshot.kv_bytes_per_token.get(model.model_name) or weights * params.kv_bytes_per_weight_byte
    busy = 1 - math.exp(-rate * output * cycle)
    if demand.busy_fraction > 0:
        busy = min(busy, demand.busy_fraction)
    if demand.queued or demand.running:
        busy = max(busy, min(1.0, demand.busy_fraction) if demand.busy_fraction else 1.0)
    base = costs.at(weights, "decode_base_s")
    # Steps with prefill: a prompt is cut into chunks of the step's token budget; small ones share a step.
    prefill_steps = max(rate * prompt / params.step_tokens, min(rate, 1 / cycle))
    per_token = (costs.at(weights, "decode_per_seq_s")
                 + (prompt + output / 2) * kv_per_token / costs.attention_bytes_per_s)
    load = (busy * base / cycle + max(0.0, prefill_steps - busy / cycle) * base
            + prefill_steps * costs.at(weights, "prefill_base_s")
            + rate * (costs.at(weights, "prefill_per_seq_s") + prompt * costs.at(weights, "prefill_per_token_s")
                      + output * per_token))
    return load / model.tp_size


def prism_policy(snapshot: ClusterSnapshot, params: PolicyParams = PolicyParams()) -> Placement:
    homes = _home_of_everyone(snapshot)
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
        memory = _memory(snapshot, key)
        return memory - _on_busiest_gpu(used, key)

    def compute_used(key: GpuKey) -> float:
        return _on_busiest_gpu(compute, key)

    def protected_rate(key: GpuKey) -> float:
        return sum(r for k, r in protected.items() if _overlaps(k, key))

    def add(name: str, key: GpuKey, active: bool, load: float = 0.0, replicas: int = 1) -> None:
        placement[name].append(ReplicaTarget(key[0], key[1], active))
        if active:
            used[key] = used.get(key, 0) + _need_per_gpu(snapshot, models[name], _memory(snapshot, key), params,
                                                         replicas)
            compute[key] = compute.get(key, 0.0) + load

    def memory_fits(model: ModelConfig, key: GpuKey, replicas: int = 1) -> bool:
        memory = _memory(snapshot, key)
        need = _need_per_gpu(snapshot, model, memory, params, replicas)
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
        return min(want, len({k[0] for k in _gpu_sets(snapshot, model.tp_size)}))

    # Hot models in order: priority; then those already running at home (they keep their GPU, so
    # noise in the rates cannot make two models swap places); then requests per unit of compute
    # (when GPUs are short, the most requests keep their SLO); then name.
    def running_at_home(m: ModelConfig) -> bool:
        return any(r.active and (r.agent_id, r.gpu_ids) == homes[m.model_name] for r in _live_replicas(snapshot, m))

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
        take(sorted((k for k in _open_sets(snapshot, model, live) if k not in active and k not in loaded),
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
        live = _live_replicas(snapshot, model)
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
            candidates = [k for k in _open_sets(snapshot, model, live) if k not in current and fits(model, k, False)]
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
        live = _live_replicas(snapshot, model)
        active = [(r.agent_id, r.gpu_ids) for r in live if r.active]
        loaded = [(r.agent_id, r.gpu_ids) for r in live]
        current = active + ([home] if home not in active else [])
        candidates = [k for k in loaded + _open_sets(snapshot, model, live) if memory_fits(model, k)]
        # Onto a set whose models were placed within its compute only while the
        # sum stays under the GPU's whole: past it, the squeeze would take their SLO too.
        candidates = [k for k in candidates
                      if not protected_rate(k) or compute_used(k) + loads[name] <= params.compute_overload]
        if not candidates and active and not short:
            candidates = active[:1]
        if not candidates:
            shed.add(name)  # not served until a set has room: its requests wait at the gateway, then fail
            continue
        key = min(candidates, key=lambda k: (not any(_overlaps(k, s) for s in sacrificed), protected_rate(k),
                                            k not in active, k not in loaded, -room(k), k))
        sacrificed.append(key)
        add(name, key, True, loads[name])
        if key not in active and current[0] != key and (key not in loaded or current[0] in active):
            add(name, current[0], True)  # keep serving from where it is until the new replica is up
    # Warm models stay where they are (active there, else at home): on while the memory has room.
    for model in (m for m in hot if warm(m)):
        name = model.model_name
        live = _live_replicas(snapshot, model)
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
        live = _live_replicas(snapshot, model)
        kept = [(r.agent_id, r.gpu_ids) for r in live if r.agent_id != placement[name][0].agent_id]
        sets = kept + sorted(_open_sets(snapshot, model, live + placement[name]),
                             key=lambda k: (weight_on.get(k[0], 0), k))
        for key in sets:
            if len(placement[name]) > count:
                break
            if all(r.agent_id != key[0] for r in placement[name]):
                placement[name].append(ReplicaTarget(key[0], key[1], False))
                weight_on[key[0]] = weight_on.get(key[0], 0) + snapshot.weight_bytes.get(name, 0)


# Policies whose target switches engines on and off (static leaves that to demand at the agents).
MANAGES_ACTIVITY = frozenset({"dedicated", "time-share", "prism"})

POLICIES: dict[str, Policy] = {
    "static": static_policy,
    "dedicated": dedicated_policy,
    "time-share": time_share_policy,
    "prism": prism_policy,
}
