"""What a placement policy reads and writes: the cluster snapshot (agents and
their GPUs, the models, their demand, what runs now), the target placement
(each model's replicas, switched on or off), and the policies' parameters;
the package's docstring says more."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from services.common.placement_config import ModelConfig
from services.common.request_sizes import DEFAULT_OUTPUT_TOKENS, DEFAULT_PROMPT_TOKENS
from services.common.step_costs import DEFAULT_STEP_TOKENS
from services.scheduler.policies.compute import H200_COMPUTE_COSTS, ComputeCosts


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
        return cls(
            arrival_rate=serving.arrival_rate,
            recent_arrival_rate=serving.recent_arrival_rate,
            queued=queued,
            running=running,
            kv_demand_bytes=kv_demand_bytes,
            busy_fraction=serving.busy_fraction,
            mean_prompt_tokens=serving.mean_prompt_tokens,
            mean_output_tokens=serving.mean_output_tokens,
        )

    def __add__(self, other: ModelDemand) -> ModelDemand:
        """Two sources' load on one model (two agents' reports, say): counts and
        rates summed, mean tokens per request averaged weighted by arrival rate."""

        def mean(a: float, b: float) -> float:
            if not a or not b:
                return a or b
            rates = self.arrival_rate + other.arrival_rate
            return (a * self.arrival_rate + b * other.arrival_rate) / rates if rates > 0 else (a + b) / 2

        return ModelDemand(
            self.arrival_rate + other.arrival_rate,
            self.queued + other.queued,
            self.running + other.running,
            self.kv_demand_bytes + other.kv_demand_bytes,
            self.busy_fraction + other.busy_fraction,
            mean(self.mean_prompt_tokens, other.mean_prompt_tokens),
            mean(self.mean_output_tokens, other.mean_output_tokens),
            self.recent_arrival_rate + other.recent_arrival_rate,
        )


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
    # An engine step's token budget (the engine's chunked prefill): the CPU engines' by default; the live
    # scheduler sets its agents' devices' and the simulator its profile's (services/common/step_costs.py).
    step_tokens: int = DEFAULT_STEP_TOKENS
    # Models with demand below this rate (requests/s) are warm rather than hot: they stay where they are,
    # active while their GPU has the memory, else switched off (their agent switches them on for a
    # request), and never move or push others away.
    warm_rate: float = 0.5
    # ... and on a GPU whose placed models weigh more than it holds (prism's `oversubscribed`), where a model
    # on for nothing blocks the next burst's activations: there a model of a few requests a second is
    # switched on by its requests (a tenth to four tenths of a second) rather than kept on.
    warm_rate_oversubscribed: float = 2.0
    # Tokens per request when the reports have none yet (services/common/request_sizes.py).
    default_prompt_tokens: float = float(DEFAULT_PROMPT_TOKENS)
    default_output_tokens: float = float(DEFAULT_OUTPUT_TOKENS)
    # KV bytes per token per weight byte, for a model whose KV geometry is not in the snapshot.
    kv_bytes_per_weight_byte: float = 1.2e-5
    # Standby replicas (prism): this many more engines of each placed model that runs one, switched
    # off, on other agents. They cost their agents' host memory (the weights) and no GPU memory; when
    # a burst needs replicas, the policy switches them on (its loaded replicas come before new sets),
    # an activation (tenths of a second) instead of a load (seconds). The gateways send requests to
    # them only while no replica is active. 0: none (the agents' host memory is not in the snapshot,
    # so this is the operator's call).
    standby_replicas: int = 0
    # prism: a model with nothing running or queued and no arrival in the reports' recent window is
    # placed as a warm one until it has a request again (is_idle_now); False: hot for the whole window.
    cooling: bool = True
    # prism: warm models stay switched on while their GPU has the memory (place_warm); False: switched
    # off, their requests switching them on (as a cold model's do).
    warm_stays_on: bool = True
    # prism: a shed model stays loaded, switched off at home (its requests switch it on where idle engines
    # can step aside; one serving now is switched off once idle); False: unplaced, so unloaded at once,
    # failing its requests in flight, its later ones waiting at the gateways. Unplaced, the hottest model
    # on one H100 (9 req/s, 46 requests running) was shed for a moment and loaded again 0.3 s later
    # (simulated, bench/one_gpu.py's 12 models, 20 req/s, seed 4: 77.2% within SLO, 83.9% staying;
    # seeds 0-5 at 8/14/20 req/s 89.5% -> 90.0%); 18 models at 90 req/s on 3/4 H200s, seeds 0-2:
    # 47.3/66.9% -> 48.4/71.3%, 5-8 GPUs unchanged.
    shed_stays_loaded: bool = True
    # kvpr: the fresh plan replaces the one that keeps models where they run only if its worst KV
    # pressure ratio is lower by more than this fraction (the original's migration threshold tau; the
    # paper gives no value).
    kvpr_tau: float = 0.2


Policy = Callable[[ClusterSnapshot, PolicyParams], Placement]

GpuKey = tuple[str, tuple[int, ...]]  # (agent id, gpu ids of one engine)
