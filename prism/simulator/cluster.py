"""The simulated cluster: agents with GPUs, the engines on them, each GPU's
memory coordinator and admission queue, and the gateway's routing.

What runs the real code (imported):
- each GPU's KV limits: services/gpu_agent/memory_policy.py (POLICIES and
  grant) on the snapshot the agent's coordinator would take (budget = GPU
  memory less the active engines' weights and the reserve), every 100 ms,
  when a request has to queue, and before an activation; and the idle
  engines switched off when the serving ones' KV demand exceeds the budget
  (make_room.engines_to_relieve, as the agent's relieve_kv_pressure);
- admission: the ordering key and the fit and shortfall arithmetic of
  services/gpu_agent/admission.py, in the same pass structure as its pump
  (a model whose earlier request waits blocks its later ones, a grant from
  the unassigned budget first, shedding past the deadline);
- batching: each engine's real BatchScheduler (see engine.py).

What is modeled: step times, activation, deactivation and load delays from the
profile; the engines with work on a GPU step at once, sharing it as the
profile's parallelism for the engine's size says (a step with n engines busy
takes max(1, n / parallelism) times its alone time; an engine with work it cannot
run yet, waiting for KV, takes no share); the gateway routes to the active
one with the fewest requests in flight (round robin among equals:
route_order) of a model's placed replicas whose engine is loaded, to a
switched-off one only when none is active (its first request switches it on,
as the agent does), and a request for a
model with no such replica goes to one of its draining engines if it has any and the model is placed (its new
replica still loads), else waits there (cold start) up to its TTFT SLO plus
30 s, then fails.

A model split over several GPUs (tensor parallelism, tp_size > 1) is one
engine listed on each of its GPUs, as the agent's coordinators see it: its
shard of the weights and its fixed KV reservation are taken on every one (no
policy plans a split engine's KV), an activation needs room on all of them
first, and its steps run on all of them at once (each step priced by the
busiest of its GPUs); its requests are admitted on its first GPU. Its step
takes the profile's time for a model of its shard's size, times
`split_step_factor` (1: as fast as that unsplit model; the live split engine
runs eager, so slower: see bench/multi_gpu.py).

An unload drains, as the agent's does (services/gpu_agent/engine_manager.py
drain), when the scheduler asks for it (the model stays placed elsewhere): an
engine with requests (running, queued in it or in admission) keeps serving
them and is removed once the last one ends, or at the drain timeout (the
agent's --drain-timeout-s), when the ones left fail; meanwhile it gets new
requests only while its model has no servable placed replica, what waits in
admission goes back to the gateway when the drain begins, and a load of it on
the same agent cancels the drain.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from prism.simulator.copy_link import CopyLink
from prism.simulator.engine import SimEngine, SimRequest, Step
from prism.simulator.models import SimModel
from prism.simulator.profile import LatencyProfile
from services.common.routing import route_order
from services.gpu_agent.admission import (
    DEFAULT_STARVATION_S,
    admission_key,
    free_tokens,
    shortfall_bytes,
)
from services.gpu_agent.engine.request import DEMAND_GROWTH_TOKENS
from services.gpu_agent.make_room import (
    ResidentEngine,
    arriving_tokens,
    engine_to_yield,
    engines_to_relieve,
    engines_to_switch_off,
    kv_kept_bytes,
)
from services.gpu_agent.memory_coordinator import DEFAULT_INTERVAL_S, DEFAULT_UNIT_BYTES
from services.gpu_agent.memory_policy import POLICIES as MEMORY_POLICIES
from services.gpu_agent.memory_policy import (
    DeviceMemorySnapshot,
    EngineMemoryDemand,
    PolicyParams,
    RecentDemand,
    grant,
    kv_shortfall_bytes,
)
from services.gpu_agent.request_stats import ServingSnapshot
from services.scheduler.policies import Placement

COLD_START_TIMEOUT_S = 30.0  # the gateway's --cold-start-timeout-s default
BUSY_WINDOW_S = 10.0  # the agent's --busy-window-s default
RELIEVE_IDLE_S = 1.0  # the agent's --relieve-idle-s default
MAKE_ROOM_IDLE_S = BUSY_WINDOW_S  # the agent's make-room spares engines this recently used (its busy window)
DRAIN_TIMEOUT_S = 30.0  # the agent's --drain-timeout-s default
RESERVE_FRACTION, RESERVE_MAX = 0.05, 4 << 30  # memory_coordinator.default_reserve_bytes on a GPU


class Clock(Protocol):
    """What the cluster needs of the event loop."""

    now: float

    def at(self, t: float, fn: Callable[[], None]) -> None: ...


@dataclass(eq=False)
class Ticket:
    request: SimRequest
    engine: SimEngine
    tokens: int
    arrival: float
    deadline: float
    reserved: bool = False


class Device:
    """One GPU: its engines, memory coordinator state and admission queue."""

    def __init__(
        self, agent_id: str, index: int, memory_bytes: int, demand_hold_s: float, reserve_bytes: int | None = None
    ):
        self.agent_id = agent_id
        self.index = index
        self.memory_bytes = memory_bytes
        self.reserve_bytes = (
            min(int(memory_bytes * RESERVE_FRACTION), RESERVE_MAX) if reserve_bytes is None else reserve_bytes
        )
        self.engines: list[SimEngine] = []
        self.waiting: list[Ticket] = []
        self.reserved: dict[str, int] = {}  # model -> tokens admitted but not yet counted by its engine
        self.recent_demand = RecentDemand(demand_hold_s)  # as the agent's coordinator keeps it
        self.running = 0  # engines' steps under way on it
        self.turn = 0

    def holding_memory(self) -> list[SimEngine]:
        """Engines whose weights are on the GPU (or on their way)."""
        return [e for e in self.engines if e.state in ("active", "activating")]


def planned(engines: list[SimEngine]) -> list[SimEngine]:
    """Those whose KV limit the device's memory policy sets: all but split ones (fixed KV)."""
    return [e for e in engines if not e.split]


def taken_bytes(engine: SimEngine) -> int:
    """What an engine holding memory takes on each of its GPUs besides planned KV: its weights' shard,
    and a split engine's fixed KV."""
    return engine.model.shard_weight_bytes + (engine.limit_bytes if engine.split else 0)


def kv_floor_bytes(engine: SimEngine) -> int:
    """The least KV limit the policy gives a planned engine: one page bundle (the agent's room check)."""
    return 0 if engine.split else engine.model.bundle_bytes


class Agent:
    def __init__(
        self, agent_id: str, num_gpus: int, memory_bytes: int, demand_hold_s: float, reserve_bytes: int | None = None
    ):
        self.agent_id = agent_id
        self.devices = {i: Device(agent_id, i, memory_bytes, demand_hold_s, reserve_bytes) for i in range(num_gpus)}
        self.engines: dict[str, SimEngine] = {}


class SimCluster:
    def __init__(
        self,
        clock: Clock,
        profile: LatencyProfile,
        models: dict[str, SimModel],
        num_gpus: int,
        gpus_per_agent: int,
        gpu_memory_bytes: int,
        memory_policy: str = "balloon",
        starvation_s: float = DEFAULT_STARVATION_S,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
        device_parallelism: float | None = None,
        stats_lead_s: float = 0.0,
        split_step_factor: float = 1.0,
        reserve_bytes: int | None = None,
        make_room_idle_s: float = MAKE_ROOM_IDLE_S,
    ):
        """device_parallelism: how many engines' steps one device runs at once, in alone-step
        equivalents, for every engine (default: the profile's for each engine's size,
        LatencyProfile.parallelism_at; 1 is fully serialized): with n engines busy on a device, each
        step takes max(1, n / parallelism) times its alone time. The CPU device, whose inline engines
        each step on a thread of their own, runs one per core.
        stats_lead_s: the engines placed when the trace starts began their request stats this long
        before it (a live cluster's engines were loaded before its traffic: their arrival rates are
        over the time since, up to the stats window; with no lead a first burst reads as a rate
        its whole window long).
        split_step_factor: a split model's step takes this many times the profile's time for a model of
        its shard's size.
        reserve_bytes: each GPU's memory kept out of the KV budget (the agent's --memory-reserve-gb);
        None: the agent's default (5%, at most 4 GiB).
        make_room_idle_s: an activation's room is made from engines idle this long (the agent's
        --busy-window-s, which its make-room uses: make_room.py)."""
        if memory_policy not in MEMORY_POLICIES:
            raise ValueError(f"memory policy {memory_policy!r} is not one of {', '.join(MEMORY_POLICIES)}")
        self.clock = clock
        self.profile = profile
        self.make_room_idle_s = make_room_idle_s
        self.models = models
        self.memory_policy = MEMORY_POLICIES[memory_policy]
        self.memory_params = PolicyParams()
        self.starvation_s = starvation_s
        self.drain_timeout_s = drain_timeout_s
        if device_parallelism is not None and device_parallelism < 1:
            raise ValueError(f"device_parallelism must be at least 1, got {device_parallelism}")
        self.device_parallelism = device_parallelism  # None: the profile's, by size
        self.copy_links: dict[tuple[str, int], CopyLink] = {}  # each GPU's host-to-device link
        self.stats_lead_s = stats_lead_s
        if split_step_factor <= 0:
            raise ValueError(f"split_step_factor must be positive, got {split_step_factor}")
        self.split_step_factor = split_step_factor
        self.agents: dict[str, Agent] = {}
        left, n = num_gpus, 0
        while left > 0:
            n += 1
            agent_id = f"agent-{n}"
            self.agents[agent_id] = Agent(
                agent_id, min(gpus_per_agent, left), gpu_memory_bytes, self.memory_params.demand_hold_s, reserve_bytes
            )
            left -= gpus_per_agent
        self.placement: Placement = {}  # the scheduler's latest target, what the gateway routes by
        self.gateway_waiting: dict[str, list[SimRequest]] = {}
        self.turns: dict[str, int] = {}
        self.on_cold_start: Callable[[], None] = lambda: None  # the scheduler re-plans at once
        self.on_done: Callable[[SimRequest], None] = lambda r: None
        self.stats = {
            "loads": 0,
            "unloads": 0,
            "activations": 0,
            "deactivations": 0,
            "deactivations_refused": 0,
            "drains": 0,
            "drain_timeouts": 0,
            "drains_cancelled": 0,
            "drain_rerouted": 0,
            "activation_out_of_memory": 0,
            "switched_off_for_room": 0,
            "switched_off_for_kv": 0,
            "switched_off_for_busier": 0,
            "preemptions": 0,
            "memory_plans": 0,
            "grants": 0,
            "steps": 0,
            "graph_captures": 0,
        }

    @property
    def now(self) -> float:
        return self.clock.now

    def device_of(self, engine: SimEngine) -> Device:
        """Its first GPU: where its requests are admitted."""
        return self.agents[engine.agent_id].devices[engine.gpu]

    def devices_of(self, engine: SimEngine) -> list[Device]:
        devices = self.agents[engine.agent_id].devices
        return [devices[g] for g in engine.gpus]

    def engines(self) -> list[SimEngine]:
        return [e for a in self.agents.values() for e in a.engines.values()]

    # ---- requests ending ---------------------------------------------------------

    def _fail(self, request: SimRequest, error: str) -> None:
        if request.done:
            return
        request.error = error
        if request.ticket is not None:
            self._release(request.ticket)
        if request.engine is not None:  # the agent counted it: it ends there
            request.engine.stats.failed()
            request.engine.stats.ended()
            self._ended_on(request.engine)
        self.on_done(request)

    def _finish(self, request: SimRequest) -> None:
        request.finished_at = self.now
        if request.ticket is not None:
            self._release(request.ticket)
        if request.engine is not None:
            assert request.first_token_at is not None  # set in _step_done before it finishes a request
            ttft = request.first_token_at - request.t
            tpot = (self.now - request.first_token_at) / (request.tokens - 1) if request.tokens > 1 else None
            request.engine.stats.finished(ttft, tpot, request.prompt_tokens, request.tokens)
            request.engine.stats.ended()
            self._ended_on(request.engine)
        self.on_done(request)

    # ---- the gateway -------------------------------------------------------------

    def _servable(self, model: str) -> list[SimEngine]:
        out = []
        for replica in self.placement.get(model, []):
            engine = self.agents[replica.agent_id].engines.get(model) if replica.agent_id in self.agents else None
            if engine is not None and engine.state in ("inactive", "activating", "active"):
                out.append(engine)
        return out

    def _draining(self, model: str) -> list[SimEngine]:
        """The model's draining engines (no longer placed): the gateway's fallback."""
        out = []
        for agent in self.agents.values():
            engine = agent.engines.get(model)
            if engine is not None and engine.draining and engine.state in ("inactive", "activating", "active"):
                out.append(engine)
        return out

    def arrive(self, request: SimRequest) -> None:
        live = self._servable(request.model)
        if not live and self.placement.get(request.model):  # placed, none servable yet: draining ones serve
            live = self._draining(request.model)
        if not live:  # cold start: wait at the gateway for a replica, up to the TTFT SLO plus the timeout
            self.gateway_waiting.setdefault(request.model, []).append(request)
            bound = self.models[request.model].ttft_s + COLD_START_TIMEOUT_S
            self.clock.at(self.now + bound, lambda: self._cold_start_timeout(request))
            self.on_cold_start()
            return
        turn = self.turns.get(request.model, 0)
        self.turns[request.model] = turn + 1
        # The gateway's rule, on the agents' counts of requests in flight.
        self._deliver(route_order(live, lambda e: e.state == "active", lambda e: e.stats.in_flight, turn)[0], request)

    def _cold_start_timeout(self, request: SimRequest) -> None:
        waiting = self.gateway_waiting.get(request.model, [])
        if request in waiting:
            waiting.remove(request)
            self._fail(
                request,
                f"UNAVAILABLE: model {request.model!r} did not become available within "
                f"{self.models[request.model].ttft_s + COLD_START_TIMEOUT_S:.0f}s",
            )

    def _published(self, model: str) -> None:
        """An engine of `model` became servable (or the placement changed): waiting requests go."""
        waiting = self.gateway_waiting.pop(model, [])
        for request in waiting:
            self.arrive(request)

    def set_placement(self, placement: Placement) -> None:
        self.placement = placement
        for model in list(self.gateway_waiting):
            if self._servable(model):
                self._published(model)

    # ---- the agent ---------------------------------------------------------------

    def _deliver(self, engine: SimEngine, request: SimRequest) -> None:
        engine.last_arrival = self.now
        engine.stats.arrived()
        request.engine = engine
        if engine.model.config.shed_load:
            self.clock.at(self.now + engine.model.ttft_s, functools.partial(self._shed_if_not_started, engine, request))
        if engine.state == "active":
            self._admit(engine, request)
        else:  # the first request for a switched-off model brings it back
            engine.pending.append(request)
            self.activate(engine)

    def _shed_if_not_started(self, engine: SimEngine, request: SimRequest) -> None:
        """A shedding model's request with no first token by its TTFT deadline is refused wherever it waits
        (the agent's admission.started_by): out of the activation's wait, the admission queue or the
        engine, its KV and compute left to requests that can still meet their SLO."""
        if request.done or request.first_token_at is not None or request.engine is not engine:
            return
        device = self.device_of(engine)
        if request in engine.pending:
            engine.pending.remove(request)
        device.waiting[:] = [t for t in device.waiting if t.request is not request]
        if request.seq is not None and engine.requests.get(request.seq) is request:
            engine.batcher.remove(request.seq)  # a step under way that computes it ends without it
            del engine.requests[request.seq]
        self._fail(
            request,
            f"RESOURCE_EXHAUSTED: model {engine.name!r} is overloaded: no first token within its TTFT SLO",
        )
        self._pump(device)
        self._kick(device)

    def load(
        self, agent_id: str, model: str, gpu_ids: tuple[int, ...], activate: bool, cap_bytes: int, instant: bool = False
    ) -> None:
        agent = self.agents[agent_id]
        if model in agent.engines and agent.engines[model].state != "failed":
            engine = agent.engines[model]
            if engine.draining:  # placed here again before it was gone: it stays
                engine.draining = False
                self.stats["drains_cancelled"] += 1
            return
        spec = self.models[model]
        if len(gpu_ids) != spec.tp_size:
            raise ValueError(f"{model}: tp_size {spec.tp_size} needs {spec.tp_size} GPU(s), got {list(gpu_ids)}")
        device = agent.devices[gpu_ids[0]]
        capacity = device.memory_bytes // spec.kv_bytes_per_token  # kvcached's virtual reservation: the whole GPU
        split = len(gpu_ids) > 1
        engine = SimEngine(
            spec,
            agent_id,
            tuple(gpu_ids),
            capacity,
            self.now,
            cap_bytes,
            clock=lambda: self.now,
            step_tokens=self.profile.step_tokens,
            stats_started_at=self.now - self.stats_lead_s if self.now <= 0 else None,
            step_factor=self.split_step_factor if split else 1.0,
        )
        agent.engines[model] = engine
        for d in self.devices_of(engine):
            d.engines.append(engine)
        self.stats["loads"] += 1

        def loaded() -> None:
            if agent.engines.get(model) is not engine:
                return  # unloaded meanwhile
            engine.state = "inactive"
            if activate:
                self.activate(engine, instant=instant)
            self._published(model)

        if instant:
            loaded()
        else:
            # A split model's ranks load at once, each its shard.
            self.clock.at(self.now + self.profile.load_s(spec.shard_weight_bytes), loaded)

    def _has_requests(self, engine: SimEngine) -> bool:
        """What a drain waits for: requests in the engine, waiting for its activation or in admission."""
        return bool(engine.requests or engine.pending) or any(
            t.engine is engine for t in self.device_of(engine).waiting
        )

    def unload(self, agent_id: str, model: str, drain: bool = True) -> None:
        """As the agent's UnloadModel: drains (at once when nothing is in flight); drain=False (force):
        at once, its requests fail."""
        engine = self.agents[agent_id].engines.get(model)
        if engine is None or (drain and engine.draining):
            return
        if not drain or engine.state in ("loading", "failed") or not self._has_requests(engine):
            self._remove(engine)
            return
        engine.draining = True
        self.stats["drains"] += 1
        token = engine.drain_token = engine.drain_token + 1
        self.clock.at(self.now + self.drain_timeout_s, lambda: self._drain_timeout(engine, token))
        # What waits in admission (not in the engine yet) goes back to the gateway, which sends it to another
        # replica (or, with none, here again, where it is served: a request arriving while it drains stays).
        device = self.device_of(engine)
        bounced = [t.request for t in device.waiting if t.engine is engine]
        device.waiting = [t for t in device.waiting if t.engine is not engine]
        for request in bounced:
            engine.stats.ended()
            request.engine = None
            self.stats["drain_rerouted"] += 1
            self.arrive(request)
        if bounced:
            self._ended_on(engine)

    def _ended_on(self, engine: SimEngine) -> None:
        """A request of the engine ended: a draining engine goes once its last one has (looked at after the
        event that ended it, so the engine's own bookkeeping is done)."""
        if engine.draining and engine.state != "unloaded":
            self.clock.at(self.now, lambda: self._drained(engine))

    def _drained(self, engine: SimEngine) -> None:
        if engine.draining and engine.state != "unloaded" and not self._has_requests(engine):
            self._remove(engine)

    def _drain_timeout(self, engine: SimEngine, token: int) -> None:
        if engine.draining and engine.drain_token == token and engine.state != "unloaded":
            self.stats["drain_timeouts"] += 1
            self._remove(engine, f"its drain timeout of {self.drain_timeout_s:g}s passed with the request unfinished")

    def _remove(self, engine: SimEngine, why: str = "") -> None:
        agent = self.agents[engine.agent_id]
        model = engine.name
        if agent.engines.get(model) is not engine:
            return
        del agent.engines[model]
        device = self.device_of(engine)
        for d in self.devices_of(engine):
            d.engines.remove(engine)
        engine.state = "unloaded"
        engine.draining = False
        self.stats["unloads"] += 1
        why = f": {why}" if why else ""
        for ticket in [t for t in device.waiting if t.engine is engine]:
            device.waiting.remove(ticket)
            self._fail(ticket.request, f"UNAVAILABLE: model {model!r} was unloaded while the request waited{why}")
        for request in engine.drop_all():
            self._fail(request, f"UNAVAILABLE: model {model!r} was unloaded while serving the request{why}")
        for d in self.devices_of(engine):
            self.rebalance(d)

    def _room(self, device: Device, engine: SimEngine) -> list[str] | None:
        """As the agent's room_to_activate on one GPU: the idle engines to switch off so that the engine's
        weights (a split one's shard and fixed KV) fit beside the others' and a page bundle of KV for each
        planned engine, beside the KV the others' requests hold (kv_kept_bytes); None when they cannot be
        made to."""
        holding = [e for e in device.holding_memory() if e is not engine]
        residents = [self._resident(e, 0 if e.split else self._kv_kept_bytes(e)) for e in holding]
        free = device.memory_bytes - device.reserve_bytes - sum(r.weight_bytes for r in residents)
        return engines_to_switch_off(
            residents, taken_bytes(engine) + kv_floor_bytes(engine), free, self.make_room_idle_s
        )

    def _kv_kept_bytes(self, e: SimEngine) -> int:
        """As the agent's: what the engine's requests hold and need soon, and its next arrivals' KV."""
        serving = e.stats.snapshot()
        arriving = arriving_tokens(serving.recent_arrival_rate, serving.mean_prompt_tokens, serving.mean_output_tokens)
        return kv_kept_bytes(
            kv_floor_bytes(e),
            e.holding_bytes,
            e.demand_tokens() * e.model.kv_bytes_per_token,
            arriving * e.model.kv_bytes_per_token,
        )

    def _resident(self, e: SimEngine, extra_bytes: int = 0) -> ResidentEngine:
        """An engine holding memory as make_room.py sees it (the agent's MemoryCoordinator._resident)."""
        return ResidentEngine(
            model=e.name,
            weight_bytes=taken_bytes(e) + extra_bytes,
            idle_s=self.now - e.last_arrival,
            serving=e.state == "activating"
            or bool(e.requests or e.pending)
            or any(t.engine is e for t in self.device_of(e).waiting),
        )

    def _resident_under_pressure(self, e: SimEngine) -> ResidentEngine:
        """As the agent's: _resident with what engine_to_yield weighs besides."""
        return replace(
            self._resident(e),
            recent_rate=e.stats.snapshot().recent_arrival_rate,
            waiting=bool(e.queued or any(t.engine is e for t in self.device_of(e).waiting)),
            in_flight=e.stats.in_flight,  # arrival to end, as the agent's request stats count it
            priority=e.model.config.priority,
        )

    def activate(self, engine: SimEngine, instant: bool = False) -> None:
        if engine.state != "inactive":
            return
        devices = self.devices_of(engine)
        if engine.split:
            engine.set_limit(engine.model.fixed_kv_bytes(engine.cap_bytes))  # what it takes while it holds memory
        # As the agent (prepare_activation_on): every GPU is checked before anything is switched off.
        rooms = [room for d in devices if (room := self._room(d, engine)) is not None]
        if len(rooms) < len(devices):  # a GPU where no room can be made (its _room is None)
            if engine.split:
                engine.set_limit(0)
            # Its weights do not fit beside the engines on a GPU: the agent refuses it at once. (Waiting for
            # room up to the requests' TTFT deadlines was simulated, 2026-12-07, and not kept: over seeds 0-3,
            # groups of 8 active, +1.6 points at 4 req/s, -7.6 at 17; bench/results/one_gpu-sim-h100-group8*.)
            self.stats["activation_out_of_memory"] += 1
            for request in engine.pending:
                self._fail(
                    request,
                    f"RESOURCE_EXHAUSTED: activating {engine.name!r} failed: its weights do not "
                    f"fit on GPU {engine.gpu} of {engine.agent_id} beside the active engines",
                )
            engine.pending.clear()
            return
        agent = self.agents[engine.agent_id]
        freed: list[Device] = []  # GPUs beyond this engine's where a split engine switched off left room
        for model in dict.fromkeys(m for room in rooms for m in room):
            other = agent.engines[model]
            if other.state == "active":  # not already switched off for another of its GPUs
                self._switch_off(other)
                self.stats["switched_off_for_room"] += 1
                freed += [d for d in self.devices_of(other) if d not in devices and d not in freed]
        engine.state = "activating"
        self.stats["activations"] += 1
        for d in devices + freed:
            self.rebalance(d)  # the others make room (and it gets a limit) before its weights arrive

        def activated() -> None:
            if engine.state != "activating":
                return
            engine.state = "active"
            for d in devices:
                self.rebalance(d)
            pending, engine.pending = engine.pending, []
            for request in pending:
                self._admit(engine, request)

        if instant:
            activated()
        else:
            self._copy_weights(engine, devices, activated)

    def _copy_weights(self, engine: SimEngine, devices: list[Device], then: Callable[[], None]) -> None:
        """The engine's weights to its GPUs (a split model's ranks copy their shards at once), each over its
        GPU's link beside the other engines' copies there (copy_link.py), then the activation's overhead."""
        left = [len(devices)]

        def copied() -> None:
            left[0] -= 1
            if not left[0]:
                self.clock.at(self.now + self.profile.activation_overhead_s, then)

        for device in devices:
            key = (device.agent_id, device.index)
            if key not in self.copy_links:
                self.copy_links[key] = CopyLink(self.clock, self.profile.copy_bytes_per_s)
            self.copy_links[key].start(engine.model.shard_weight_bytes, copied)

    def deactivate(self, engine: SimEngine, busy_window_s: float = 0.0) -> bool:
        """As the agent's DeactivateModel without force: refused while the engine is busy (a request
        running or waiting in it, or one arrived within busy_window_s, or 0: the agent's busy window)."""
        if engine.state != "active":
            return engine.state == "inactive"
        window_s = busy_window_s if busy_window_s > 0 else BUSY_WINDOW_S
        if engine.busy(self.now, window_s) or any(t.engine is engine for t in self.device_of(engine).waiting):
            self.stats["deactivations_refused"] += 1
            return False
        self._switch_off(engine)
        for d in self.devices_of(engine):
            self.rebalance(d)
        return True

    def _switch_off(self, engine: SimEngine) -> None:
        engine.state = "inactive"  # the deactivation's few ms are not modeled: nothing runs on it
        engine.set_limit(0)
        engine.drop_graphs()
        self.stats["deactivations"] += 1

    # ---- the memory coordinator --------------------------------------------------

    def _pending_tokens(self, device: Device, model: str) -> int:
        return device.reserved.get(model, 0) + sum(t.tokens for t in device.waiting if t.engine.name == model)

    @staticmethod
    def _budget_and_unit(device: Device, holding: list[SimEngine]) -> tuple[int, int]:
        """The device's KV budget (its memory less the weights on it, split engines' fixed KV and the
        reserve) and default unit."""
        budget = max(0, device.memory_bytes - sum(taken_bytes(e) for e in holding) - device.reserve_bytes)
        return budget, max((e.model.bundle_bytes for e in planned(holding)), default=DEFAULT_UNIT_BYTES)

    def memory_snapshot(self, device: Device) -> DeviceMemorySnapshot:
        holding = device.holding_memory()
        budget, unit = self._budget_and_unit(device, holding)
        pending = dict(device.reserved)  # _pending_tokens of every engine, in one pass over the queue
        for ticket in device.waiting:
            pending[ticket.engine.model.config.model_name] = (
                pending.get(ticket.engine.model.config.model_name, 0) + ticket.tokens
            )
        engines = []
        for e in planned(holding):
            demand = (e.demand_tokens() + pending.get(e.name, 0)) * e.model.kv_bytes_per_token
            engines.append(
                EngineMemoryDemand(
                    model=e.name,
                    priority=e.model.priority,
                    used_bytes=e.holding_bytes,
                    demand_bytes=demand,
                    limit_bytes=e.limit_bytes,
                    cap_bytes=e.cap_bytes,
                    unit_bytes=e.model.bundle_bytes,
                    recent_demand_bytes=device.recent_demand.observe(e.name, self.now, demand),
                )
            )
        device.recent_demand.forget_all_but({e.name for e in planned(holding)})
        return DeviceMemorySnapshot(budget_bytes=budget, unit_bytes=unit, engines=tuple(engines))

    def limits_snapshot(self, device: Device) -> DeviceMemorySnapshot:
        """The device's budget and limits without the engines' demand: all that
        `grant` reads. Demand walks every waiting request, and admission asks
        for a grant once per blocked model in each pass over the queue: with
        the full snapshot, an overloaded 200-model run spent most of its time
        (224 of 305 s) re-counting the queue."""
        holding = device.holding_memory()
        budget, unit = self._budget_and_unit(device, holding)
        return DeviceMemorySnapshot(
            budget_bytes=budget,
            unit_bytes=unit,
            engines=tuple(
                EngineMemoryDemand(
                    model=e.name,
                    priority=e.model.priority,
                    used_bytes=e.holding_bytes,
                    demand_bytes=0,
                    limit_bytes=e.limit_bytes,
                    cap_bytes=e.cap_bytes,
                    unit_bytes=e.model.bundle_bytes,
                )
                for e in planned(holding)
            ),
        )

    def rebalance(self, device: Device) -> None:
        """One plan of the device's KV limits, then admission and compute look again."""
        holding = planned(device.holding_memory())
        if holding:
            plan = self.memory_policy(self.memory_snapshot(device), self.memory_params)
            self.stats["memory_plans"] += 1
            for engine in holding:
                if engine.name in plan:
                    engine.set_limit(plan[engine.name])
        self._pump(device)
        self._kick(device)

    def memory_tick(self) -> None:
        for agent in self.agents.values():
            for device in agent.devices.values():
                if device.holding_memory():
                    self.rebalance(device)
                    self.relieve_kv_pressure(device)

    def relieve_kv_pressure(self, device: Device) -> None:
        """As the agent's coordinator (relieve_kv_pressure), balloon policy only: idle engines switched off
        while the serving engines' KV demand exceeds the budget."""
        if self.memory_policy is not MEMORY_POLICIES["balloon"]:
            return
        shortfall = kv_shortfall_bytes(self.memory_snapshot(device))
        if shortfall <= 0:
            return
        holding = [e for e in planned(device.holding_memory()) if e.state == "active"]
        residents = [self._resident_under_pressure(e) for e in holding]
        chosen = engines_to_relieve(residents, shortfall, RELIEVE_IDLE_S)
        agent = self.agents[device.agent_id]
        for model in chosen:
            self._switch_off(agent.engines[model])
            self.stats["switched_off_for_kv"] += 1
        if not chosen and (trickle := engine_to_yield(residents)) is not None:
            self._switch_off_serving(agent.engines[trickle], device)
            self.stats["switched_off_for_busier"] += 1
            chosen = [trickle]
        if chosen:
            self.rebalance(device)

    def _switch_off_serving(self, engine: SimEngine, device: Device) -> None:
        """As the agent's switch-off of an engine serving a trickle (engine_to_yield): its requests, those
        waiting for admission and those running, fail."""
        why = f"RESOURCE_EXHAUSTED: model {engine.name!r} was switched off while serving, for busier engines' KV"
        for ticket in [t for t in device.waiting if t.engine is engine]:
            device.waiting.remove(ticket)
            self._fail(ticket.request, why)
        for request in engine.drop_all():
            self._fail(request, why)
        self._switch_off(engine)

    # ---- admission ---------------------------------------------------------------

    def _free(self, device: Device, engine: SimEngine) -> int:
        return free_tokens(
            engine.limit_bytes,
            engine.model.kv_bytes_per_token,
            engine.demand_tokens(),
            engine.used_bytes,
            device.reserved.get(engine.name, 0),
        )

    def _admit(self, engine: SimEngine, request: SimRequest) -> None:
        device = self.device_of(engine)
        ticket = Ticket(
            request, engine, request.prompt_tokens + DEMAND_GROWTH_TOKENS, self.now, self.now + engine.model.ttft_s
        )
        if not device.waiting and ticket.tokens <= self._free(device, engine):
            self._start(device, ticket)
            self._kick(device)
            return
        device.waiting.append(ticket)
        self.rebalance(device)  # demand just grew (the coordinator is poked), then the queue is pumped

    def _pump(self, device: Device) -> None:
        if not device.waiting:
            return
        now = self.now
        blocked: set[str] = set()
        limits = None  # the limits snapshot for grants, taken again only after a grant changed a limit
        for ticket in sorted(
            device.waiting, key=lambda t: admission_key(t.arrival, t.deadline, now, self.starvation_s)
        ):
            engine = ticket.engine
            if engine.name in blocked:
                continue
            if engine.model.config.shed_load and now > ticket.deadline:
                device.waiting.remove(ticket)
                self._fail(
                    ticket.request,
                    f"RESOURCE_EXHAUSTED: model {engine.name!r} is overloaded: the request "
                    f"waited {now - ticket.arrival:.2f}s for memory",
                )
                continue
            free = self._free(device, engine)
            if ticket.tokens > free:
                limits = limits or self.limits_snapshot(device)
                new_limit = grant(
                    limits, engine.name, shortfall_bytes(ticket.tokens, free, engine.model.kv_bytes_per_token)
                )
                if new_limit is None:
                    blocked.add(engine.name)
                    continue
                engine.set_limit(new_limit)
                limits = None
                self.stats["grants"] += 1
                if ticket.tokens > self._free(device, engine):
                    blocked.add(engine.name)
                    continue
            device.waiting.remove(ticket)
            self._start(device, ticket)

    def _start(self, device: Device, ticket: Ticket) -> None:
        ticket.reserved = True
        device.reserved[ticket.engine.name] = device.reserved.get(ticket.engine.name, 0) + ticket.tokens
        ticket.request.ticket = ticket
        if not ticket.engine.submit(ticket.request):
            self._fail(
                ticket.request,
                f"RESOURCE_EXHAUSTED: the prompt of {ticket.request.prompt_tokens} tokens is "
                f"over {ticket.engine.name!r}'s KV limit",
            )

    def _unreserve(self, ticket: Ticket) -> None:
        if not ticket.reserved:
            return
        ticket.reserved = False
        device = self.device_of(ticket.engine)
        left = device.reserved.get(ticket.engine.name, 0) - ticket.tokens
        if left > 0:
            device.reserved[ticket.engine.name] = left
        else:
            device.reserved.pop(ticket.engine.name, None)

    def _release(self, ticket: Ticket) -> None:
        self._unreserve(ticket)
        ticket.request.ticket = None
        if ticket.engine.state != "unloaded":
            self._pump(self.device_of(ticket.engine))

    # ---- compute -----------------------------------------------------------------

    def _kick(self, device: Device) -> None:
        """Starts a step for every engine on the device that has something to run and is not stepping
        (round robin from the device's turn): they share the device (`device_parallelism`). Processor
        sharing, priced when the steps start: by the engines stepping on the device once every one
        that can step has started (one with work it cannot run yet, waiting for KV, takes no share)."""
        started = []
        while (started_step := self._start_next_step(device)) is not None:
            started.append(started_step)
        stepping = sum(1 for e in device.engines if e.stepping)
        for engine, step in started:
            # A split engine steps on all its GPUs: priced by the busiest.
            busy = (
                max(sum(1 for e in d.engines if e.stepping) for d in self.devices_of(engine))
                if engine.split
                else stepping
            )
            prefill = step.result.num_decode != len(step.result.batch)
            duration = step.duration_s * max(1.0, busy / self._parallelism(engine, prefill))
            self.clock.at(self.now + duration, functools.partial(self._step_done, device, engine, step))

    def _parallelism(self, engine: SimEngine, prefill: bool = False) -> float:
        """The parallelism the engine's steps see beside others': the one given for every engine, else the
        profile's for its size (a split engine's shard) and kind of step (with prompt tokens or not)."""
        if self.device_parallelism is not None:
            return self.device_parallelism
        return self.profile.parallelism_at(engine.model.shard_weight_bytes, prefill)

    def _start_next_step(self, device: Device) -> tuple[SimEngine, Step] | None:
        n = len(device.engines)
        for i in range(n):
            position = (device.turn + i) % n
            engine = device.engines[position]
            if (
                engine.state != "active"
                or engine.stepping
                or engine.gpu != device.index
                or not engine.batcher.has_work()
            ):
                continue  # (a split engine's steps start from its first GPU)
            step = engine.start_step(self.profile)
            if step is None:
                continue
            for request in step.too_big:
                self._fail(request, f"RESOURCE_EXHAUSTED: the request needs more KV than {engine.name!r} can hold")
            self.stats["preemptions"] += len(step.result.preempted)
            if not step.result.batch:
                continue
            device.turn = (position + 1) % n
            device.running += 1
            self.stats["steps"] += 1
            self.stats["graph_captures"] += step.captured
            return engine, step
        return None

    def _step_done(self, device: Device, engine: SimEngine, step: Step) -> None:
        device.running -= 1
        first, finished = engine.end_step(step)
        for request in first:
            request.first_token_at = self.now
            if request.ticket is not None:  # the engine holds its KV now: admission's reservation goes
                self._unreserve(request.ticket)
        for request in finished:
            self._finish(request)
        self._pump(device)
        self._kick(device)

    # ---- what the load reports say --------------------------------------------------

    def serving(self, engine: SimEngine) -> ServingSnapshot:
        """The agent's request stats for the engine (services/gpu_agent/request_stats.py on simulated time):
        arrival rate, busy fraction, mean tokens per request over the window."""
        return engine.stats.snapshot()

    def queued(self, engine: SimEngine) -> int:
        waiting = sum(1 for t in self.device_of(engine).waiting if t.engine is engine)
        return waiting + engine.queued + len(engine.pending)

    def kv_demand_bytes(self, engine: SimEngine) -> int:
        if engine.state not in ("active", "activating"):
            return 0
        device = self.device_of(engine)
        return (engine.demand_tokens() + self._pending_tokens(device, engine.name)) * engine.model.kv_bytes_per_token


MEMORY_INTERVAL_S = DEFAULT_INTERVAL_S
