"""The simulated global scheduler: the real placement policy
(services/scheduler/policies/__init__.py POLICIES) and action planner
(services/scheduler/actions.py plan_actions) on a snapshot of the simulated
cluster, re-planned every `interval_s` (the scheduler's --replan-interval-s)
and at once when a request starts waiting at the gateway for a model no
agent serves, as the real loop does on a demand record. The actions take
effect with the profile's delays (load, activation); a deactivation the
agent refuses (the engine was busy) is asked again at the next plan; an
unload of a replica whose model stays placed elsewhere drains the engine
first (SimCluster.unload), one of a model placed nowhere is at once.

Not modeled: the load reports' 0.5 s lag (the snapshot reads the agents'
numbers at the moment of the plan) and failed or retried actions."""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterable

from prism.simulator.cluster import SimCluster
from services.common.records import EngineRecord
from services.scheduler.actions import (
    DEACTIVATE_BUSY_WINDOW_S,
    Action,
    current_placement,
    plan_actions,
    still_held_off,
)
from services.scheduler.demand import DemandMemory, EngineKey, EngineLoad
from services.scheduler.policies import (
    MANAGES_ACTIVITY,
    POLICIES,
    AgentView,
    ClusterSnapshot,
    ModelDemand,
    PolicyParams,
    with_waiting,
)

DEFAULT_REPLAN_INTERVAL_S = 2.0
# The live loop's pause between a wake (a demand record) and its re-plan, which makes a burst of
# wakes one re-plan (services/scheduler/server.py REPLAN_COALESCE_S).
REPLAN_COALESCE_S = 0.05


class Foresight:
    """Each model's arrival rate over the next `window_s` of the trace: what a perfect demand forecast
    would tell the scheduler. An upper bound for measurement, not a policy (no live scheduler knows the
    future): run with it, a policy shows how much of what it misses better forecasting could win back."""

    def __init__(self, arrivals: Iterable[tuple[float, str]], window_s: float):
        if window_s <= 0:
            raise ValueError(f"foresight window must be > 0 s, got {window_s}")
        self.window_s = window_s
        self._times: dict[str, list[float]] = {}
        for t, model in arrivals:
            self._times.setdefault(model, []).append(t)
        for times in self._times.values():
            times.sort()

    def rates(self, now: float) -> dict[str, float]:
        """model -> its arrivals in [now, now + window_s) per second."""
        end = now + self.window_s
        return {
            model: (bisect.bisect_left(times, end) - bisect.bisect_left(times, now)) / self.window_s
            for model, times in self._times.items()
        }

    def foreseen(self, demand: dict[str, ModelDemand], models: Iterable[str], now: float) -> dict[str, ModelDemand]:
        """`demand` with every model's measured rates (window and recent) replaced by the foreseen one;
        its queued and running requests, KV demand and token means as measured."""
        rates = self.rates(now)
        return {
            name: dataclasses.replace(
                demand.get(name, ModelDemand()),
                arrival_rate=rates.get(name, 0.0),
                recent_arrival_rate=rates.get(name, 0.0),
            )
            for name in dict.fromkeys([*demand, *models])
        }


class SimScheduler:
    def __init__(
        self,
        cluster: SimCluster,
        policy: str,
        interval_s: float = DEFAULT_REPLAN_INTERVAL_S,
        params: PolicyParams | None = None,
        deactivate_busy_window_s: float = DEACTIVATE_BUSY_WINDOW_S,
        foresight: Foresight | None = None,
    ):
        if policy not in POLICIES:
            raise ValueError(f"placement policy {policy!r} is not one of {', '.join(POLICIES)}")
        self.cluster = cluster
        self.policy_name = policy
        self.policy = POLICIES[policy]
        self.manages_activity = policy in MANAGES_ACTIVITY
        self.interval_s = interval_s
        # The policy prices compute with the same step costs the simulated GPUs run at.
        self.params = params if params is not None else PolicyParams(compute=cluster.profile.compute_costs())
        self.plans = 0
        self.deactivate_busy_window_s = deactivate_busy_window_s  # plan_actions' (0: the agent's busy window)
        self.activated_at: dict[tuple[str, str], float] = {}  # as the live scheduler's (still_held_off)
        self.foresight = foresight  # None: the policy plans on measured demand, as live
        self.demand_memory = DemandMemory()  # as the live scheduler's (services/scheduler/demand.py)

    def records(self) -> dict[tuple[str, str], EngineRecord]:
        """The engine records the agents would have in etcd (activating reads inactive, as it does there;
        a draining engine reads draining)."""
        out = {}
        for engine in self.cluster.engines():
            state = "draining" if engine.draining else {"activating": "inactive"}.get(engine.state, engine.state)
            out[(engine.agent_id, engine.name)] = EngineRecord(
                agent_id=engine.agent_id, model=engine.name, state=state, gpu_ids=list(engine.gpus)
            )
        return out

    def snapshot(self, records: dict[tuple[str, str], EngineRecord]) -> ClusterSnapshot:
        cluster = self.cluster
        loads: dict[EngineKey, EngineLoad] = {}
        for engine in cluster.engines():
            if engine.draining:  # on its way out: the agent does not report its load (it needs no placement)
                continue
            serving = cluster.serving(engine)
            loads[(engine.agent_id, engine.name)] = EngineLoad(
                ModelDemand.from_serving(
                    serving,
                    queued=cluster.queued(engine),
                    running=engine.running,
                    kv_demand_bytes=cluster.kv_demand_bytes(engine) * engine.model.tp_size,
                ),  # as the scheduler counts it
                serving.window_s,
            )
        demand = self.demand_memory.demand(cluster.now, loads)
        # The gateways' demand records.
        demand = with_waiting(demand, {model: len(waiting) for model, waiting in cluster.gateway_waiting.items()})
        if self.foresight is not None:
            demand = self.foresight.foreseen(demand, cluster.models, cluster.now)
        # What weights and KV may take on each GPU, as the live scheduler reads it (usable_gpu_memory).
        agents = tuple(
            AgentView(
                a.agent_id, frozenset(a.devices), {i: d.memory_bytes - d.reserve_bytes for i, d in a.devices.items()}
            )
            for a in cluster.agents.values()
        )
        return ClusterSnapshot(
            models=tuple(m.config for m in cluster.models.values()),
            agents=agents,
            demand=demand,
            weight_bytes={name: m.weight_bytes for name, m in cluster.models.items()},
            current=current_placement(records),
            # a split model's per GPU, times its GPUs: the whole model's, as the policies take it
            kv_bytes_per_token={name: m.kv_bytes_per_token * m.tp_size for name, m in cluster.models.items()},
        )

    def replan(self, instant: bool = False) -> None:
        """instant: the actions take effect at once (the cluster was up before the trace began)."""
        records = self.records()
        target = self.policy(self.snapshot(records), self.params)
        self.plans += 1
        self.cluster.set_placement(target)
        now = self.cluster.now
        self.activated_at = still_held_off(self.activated_at, now)
        for action in plan_actions(
            target,
            records,
            set(self.cluster.agents),
            self.manages_activity,
            self.deactivate_busy_window_s,
            held_off=frozenset(self.activated_at),
        ):
            self.execute(action, instant)

    def execute(self, action: Action, instant: bool) -> None:
        cluster = self.cluster
        engine = cluster.agents[action.agent_id].engines.get(action.model)
        if action.kind == "load":
            cluster.load(
                action.agent_id,
                action.model,
                action.gpu_ids,
                action.activate,
                action.memory_limit_bytes,
                instant=instant,
            )
        elif action.kind == "unload":
            cluster.unload(action.agent_id, action.model, drain=action.drain)
        elif action.kind == "activate" and engine is not None:
            cluster.activate(engine, instant=instant)
            self.activated_at[(action.agent_id, action.model)] = cluster.now
        elif action.kind == "deactivate" and engine is not None:
            cluster.deactivate(engine, action.busy_window_s)
