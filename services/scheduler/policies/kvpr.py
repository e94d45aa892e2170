"""`kvpr`: the original Prism's placement heuristic (arXiv 2505.04021), kept as
a baseline so that our `prism` policy is measured against it on the same trace.

Each model with demand weighs w = arrival rate / TTFT SLO (a tighter SLO
weighs more). A GPU's KV pressure ratio (KVPR) is the sum of w of the active
models on it over the KV memory it has left after their weights. The models
are taken by w, largest first, and each goes to the GPU set where the worst
ratio over all GPUs stays lowest (then its own ratio, then the set's order):
placement for balance. A set takes a model only if, with its weights, every
one of its GPUs keeps at least `min_kv_fraction` of its memory for KV; a
model that fits nowhere is placed switched off where it is (or at its home),
so its agent switches it on for a request when idle engines can step aside:
the original's time sharing.

Migration threshold tau (`PolicyParams.kvpr_tau`), per model: a placed model
(where its engine is active, else loaded or loading) stays where it is unless
the heuristic's best set keeps the worst ratio lower than staying does by more
than the fraction tau; re-planned at every scheduler pass from the measured
rates. (Taking a whole fresh plan whenever its worst ratio was lower by more
than tau moved every model the fresh plan put elsewhere: simulated, 18 models
at 90 req/s on 6 H200s, 412 loads and 394 unloads in 150 s.) A model moves
only between agents (an agent runs one engine per model), so its candidate
sets are the one it runs on and those of other agents.

Models without demand stay placed, switched off. Nothing here prices
compute: the heuristic balances KV pressure alone, which is what `prism`
adds to (compute loads, replicas for models that need more than one GPU,
triage when GPUs are short).
"""

from __future__ import annotations

from collections.abc import Mapping

from services.common.placement_config import ModelConfig
from services.scheduler.policies.gpu_sets import gpu_sets, home_of_everyone, live_replicas
from services.scheduler.policies.snapshot import ClusterSnapshot, GpuKey, Placement, PolicyParams, ReplicaTarget

DEFAULT_TTFT_S = 1.0  # the agent's default TTFT SLO (services/gpu_agent/slo.py)
# w of a model with requests waiting or running but no measured rate yet (a cold start): it still
# needs a place, after the models whose rate is known.
UNMEASURED_RATE = 1e-6

GpuId = tuple[str, int]  # (agent id, gpu index)


def pressure_weight(snapshot: ClusterSnapshot, model: ModelConfig) -> float:
    """w = requests/s over the TTFT SLO in seconds."""
    demand = snapshot.demand_of(model.model_name)
    rate = demand.arrival_rate or (UNMEASURED_RATE if demand.hot else 0.0)
    slo_s = (model.ttft_slo_ms / 1000) if model.ttft_slo_ms else DEFAULT_TTFT_S
    return rate / slo_s


class PressureMap:
    """Each GPU's weights and summed w of the models assigned so far, and the ratios they give."""

    def __init__(self, snapshot: ClusterSnapshot, params: PolicyParams):
        self.snapshot = snapshot
        self.params = params
        self.memory: dict[GpuId, int] = {(a.agent_id, g): a.memory_of(g) for a in snapshot.agents for g in a.gpu_ids}
        self.weights: dict[GpuId, int] = dict.fromkeys(self.memory, 0)
        self.pressure: dict[GpuId, float] = dict.fromkeys(self.memory, 0.0)
        # Every GPU's ratio, highest first, until the next add: a candidate's worst over the other GPUs
        # is the first entry outside it, not a pass over all of them (200 models on 64 GPUs: a pass of
        # the policy took 0.39 s that way, 0.09 s now with the shares kept per model).
        self._ranking: list[tuple[float, GpuId]] | None = None
        self._per_gpu: dict[tuple[str, int], tuple[int, float]] = {}  # (model, GPUs) -> its shard, its w share

    def _shares(self, model: ModelConfig, key: GpuKey) -> tuple[list[GpuId], int, float]:
        gpus = [(key[0], g) for g in key[1]]
        per_gpu = self._per_gpu.get((model.model_name, len(gpus)))
        if per_gpu is None:
            weights = self.snapshot.weight_bytes.get(model.model_name, 0)
            per_gpu = weights // len(gpus), pressure_weight(self.snapshot, model) / len(gpus)
            self._per_gpu[(model.model_name, len(gpus))] = per_gpu
        return gpus, *per_gpu

    def ratio(self, gpu: GpuId, extra_weights: int = 0, extra_pressure: float = 0.0) -> float:
        kv_left = self.memory[gpu] - self.weights[gpu] - extra_weights
        pressure = self.pressure[gpu] + extra_pressure
        if not self.memory[gpu]:
            return pressure  # memory unknown: balance w alone
        return pressure / kv_left if kv_left > 0 else float("inf")

    def best_option(self, model: ModelConfig, candidates: list[GpuKey]) -> tuple[float, float, GpuKey] | None:
        """Of the candidate sets the model fits, the one where the worst ratio over every GPU stays
        lowest were the model added (then the set's own worst, then the set's order), as (that worst
        ratio, the set's own, the set); None if it fits none. A set takes the model only if, with its
        weights, every GPU of it keeps min_kv_fraction of its memory for KV (a GPU of unknown memory
        takes anything). One loop over the candidates: this is the policy's inner loop (200 models on
        64 GPUs: about a million candidate looks a simulated minute)."""
        if not candidates:
            return None
        _, shard, w = self._shares(model, candidates[0])  # every candidate has the model's tp size
        memory, weights, pressure = self.memory, self.weights, self.pressure
        min_fraction = self.params.min_kv_fraction
        # The first GPU outside a set of n GPUs is among the n + 1 highest.
        highest = self._ranked()[: len(candidates[0][1]) + 1]
        best: tuple[float, float, GpuKey] | None = None
        for key in candidates:
            agent, ids = key
            own = float("-inf")
            for i in ids:
                g = (agent, i)
                total, kv_left = memory[g], memory[g] - weights[g] - shard
                if total and kv_left < min_fraction * total:
                    break  # does not fit
                added = pressure[g] + w
                own = max(own, added if not total else added / kv_left if kv_left > 0 else float("inf"))
            else:
                others = next((ratio for ratio, g in highest if g[0] != agent or g[1] not in ids), 0.0)
                option = (max(own, others), own, key)
                if best is None or option < best:
                    best = option
        return best

    def _ranked(self) -> list[tuple[float, GpuId]]:
        if self._ranking is None:
            self._ranking = sorted(((self.ratio(g), g) for g in self.memory), reverse=True)
        return self._ranking

    def add(self, model: ModelConfig, key: GpuKey, sign: int = 1) -> None:
        gpus, shard, w = self._shares(model, key)
        for g in gpus:
            self.weights[g] += sign * shard
            self.pressure[g] += sign * w
        self._ranking = None

    def remove(self, model: ModelConfig, key: GpuKey) -> None:
        self.add(model, key, -1)


def _candidate_sets(live: list[ReplicaTarget], sets: list[GpuKey]) -> list[GpuKey]:
    """Where a model may be active, of the cluster's sets of its size: the sets it runs on (`live`, its
    live replicas), and any set of an agent that does not run it."""
    hosting = {r.agent_id for r in live}
    return sorted({(r.agent_id, r.gpu_ids) for r in live} | {k for k in sets if k[0] not in hosting})


def _assign(
    snapshot: ClusterSnapshot,
    params: PolicyParams,
    models: list[ModelConfig],
    candidates: Mapping[str, list[GpuKey]],
    placed: Mapping[str, GpuKey],
) -> dict[str, GpuKey]:
    """The heuristic. Every placed model counts where it is; then, in order of w, each model goes to
    the set that keeps the worst ratio lowest, unless it is placed and staying keeps the worst ratio
    within (1 + tau) of that, the others where they are meanwhile (a move costs a load and a drain:
    only for a gain beyond tau). Returns model -> set (a model that fits nowhere is absent)."""
    pressure = PressureMap(snapshot, params)
    where = {}
    for model in models:
        key = placed.get(model.model_name)
        if key is not None and pressure.best_option(model, [key]) is not None:
            pressure.add(model, key)
            where[model.model_name] = key
    out: dict[str, GpuKey] = {}
    for model in models:
        staying = None
        if model.model_name in where:
            pressure.remove(model, where[model.model_name])
            staying = pressure.best_option(model, [where[model.model_name]])
        best = pressure.best_option(model, candidates[model.model_name])
        if staying is not None and (best is None or staying[0] <= (1 + params.kvpr_tau) * best[0]):
            best = staying
        if best is not None:
            pressure.add(model, best[2])
            out[model.model_name] = best[2]
    return out


def kvpr_policy(snapshot: ClusterSnapshot, params: PolicyParams = PolicyParams()) -> Placement:
    """The original Prism's KV-pressure placement (the module says how): hot models by weight w =
    rate / SLO, each where the worst GPU's pressure stays lowest, a move only past tau.

    Args:
        snapshot: the cluster as the scheduler sees it: agents and their GPUs, models, live replicas and
            each model's demand (policies/snapshot.py).
        params: the policies' knobs (PolicyParams: compute costs and bounds, warm rates, kvpr's tau).

    Returns:
        The target placement: each model's replicas (agent, GPU ids, whether active).
    """
    homes = home_of_everyone(snapshot)
    hot = sorted(
        (m for m in snapshot.models if snapshot.demand_of(m.model_name).hot and m.model_name in homes),
        key=lambda m: (-pressure_weight(snapshot, m), m.model_name),
    )
    # Where each hot model is now: its active replica, else one loaded or loading there (a loading engine
    # reads inactive). Keeping only the active ones let every pass move a model whose load had not
    # ended: 200 models on 64 GPUs loaded 2,312 engines in 5 simulated seconds, 11 a model.
    sets = {size: gpu_sets(snapshot, size) for size in {m.tp_size for m in hot}}
    placed, candidates = {}, {}
    for model in hot:
        live = sorted(live_replicas(snapshot, model), key=lambda r: not r.active)
        if live:
            placed[model.model_name] = (live[0].agent_id, live[0].gpu_ids)
        candidates[model.model_name] = _candidate_sets(live, sets[model.tp_size])
    chosen = _assign(snapshot, params, hot, candidates, placed)
    placement: Placement = {m.model_name: [] for m in snapshot.models}
    for model in snapshot.models:
        name = model.model_name
        if name in chosen:
            placement[name] = [ReplicaTarget(chosen[name][0], chosen[name][1], True)]
        elif name in homes:
            live = live_replicas(snapshot, model)
            where = next(((r.agent_id, r.gpu_ids) for r in live if r.active), homes[name])
            placement[name] = [ReplicaTarget(where[0], where[1], False)]
    return placement
