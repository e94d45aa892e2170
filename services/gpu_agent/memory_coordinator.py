"""The memory coordinator of one device: sets each engine's KV limit.

Every `interval_s` (100 ms), and at once when poked (an arrival burst, a
request's end, an engine loaded or switched on or off), it takes a snapshot
of the device — its KV budget (memory less the active engines' weights and a
reserve) and each active engine's demand, use and limit — runs the chosen
policy (memory_policy.py, a pure function) and applies the new limits through
the engines' balloons: shrinks first, then grows, each with the engine's next
revision, so the limits never sum to more than the budget, not even between
two calls. Admission (admission.py) asks it for immediate grants out of the
budget no engine holds, so a burst need not wait for the next plan. Under the
balloon policy, when the serving engines' demand exceeds the whole budget,
idle engines are switched off to give it their weights' memory
(relieve_kv_pressure). On a GPU the reserve is at least what its processes
were measured to hold beyond the weights and KV counted here (the engine
workers read the device's memory in use; observe_overhead).

All of it runs on the agent's event loop under one lock per device: a plan
and a grant never interleave.

A model split over several GPUs (tensor parallelism) holds KV on each of
them. Its first device's coordinator plans its limit, and the others count
that limit, with its shard of the weights, as taken while it is active. A
split built-in engine's KV is fixed when it is loaded (its ranks allocate
their page pools whole; growing one would mean every rank re-allocating in
step): no device plans it, and every one it spans counts it as taken, so
the engines planned beside it never get that memory."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace

from services.gpu_agent.devices import Device
from services.gpu_agent.engine.errors import CapacityError, EngineError
from services.gpu_agent.engine.request import EngineStats
from services.gpu_agent.engine_manager import (
    EngineManager,
    EngineNotReadyError,
    ManagedEngine,
    ModelNotLoadedError,
)
from services.gpu_agent.make_room import (
    ResidentEngine,
    arriving_tokens,
    engine_to_yield,
    engines_to_relieve,
    engines_to_switch_off,
    kv_kept_bytes,
)
from services.gpu_agent.memory_policy import (
    POLICIES,
    DeviceMemorySnapshot,
    EngineMemoryDemand,
    PolicyParams,
    RecentDemand,
    cache_to_free,
    grant,
    kv_shortfall_bytes,
)
from services.gpu_agent.memory_split import DeviceMemorySplit, EngineMemory

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 0.1
DEFAULT_UNIT_BYTES = 2 << 20  # before any engine says its page bundle
# An engine with a request this recent is not switched off to make room (the agent's busy window: the
# scheduler's deactivations did too until they could skip it). Sparing none thrashed a crowded GPU in
# simulation (make_room.py).
DEFAULT_MAKE_ROOM_IDLE_S = 10.0
# KV pressure switches off engines idle this long: a second after their last request, not the busy
# window, since the serving engines' requests wait meanwhile (simulated, bench/one_gpu.py's 12 models
# on an H100, seed 0, 12 req/s: time-share 90.6% within SLO waiting 10 s, 95.4% waiting 1 s; prism at 8 req/s
# 80.3% and 91.2%).
DEFAULT_RELIEVE_IDLE_S = 1.0
# The measured overhead (observe_overhead): a reading counts once it has held this long (the least of the
# readings over it)...
OVERHEAD_SETTLE_S = 3.0
# ... and the overhead is the most of those over this window, plus this margin.
OVERHEAD_WINDOW_S = 30.0
OVERHEAD_MARGIN_BYTES = 1 << 30


def default_reserve_bytes(device: Device) -> int:
    """Kept out of the KV budget for what the engines need besides weights
    and KV (activations, CUDA graphs, the CUDA context, fragmentation): 5% of
    the device, at most 4 GiB on a GPU; nothing on the CPU, whose memory
    budget is set by hand."""
    if device.kind == "cpu":
        return 0
    return min(device.memory_bytes // 20, 4 << 30)


class MemoryCoordinator:
    def __init__(
        self,
        device: Device,
        manager: EngineManager,
        policy: str = "balloon",
        reserve_bytes: int | None = None,
        interval_s: float = DEFAULT_INTERVAL_S,
        params: PolicyParams = PolicyParams(),
        kv_budget_cap_bytes: int = 0,
        clock: Callable[[], float] = time.monotonic,
        make_room_idle_s: float = DEFAULT_MAKE_ROOM_IDLE_S,
        relieve_idle_s: float = DEFAULT_RELIEVE_IDLE_S,
    ):
        """kv_budget_cap_bytes: the KV budget never exceeds this (0: no cap),
        for a device shared with something else, or a benchmark that wants
        memory to be scarce.
        make_room_idle_s: an activation's room is made from engines idle this long (make_room.py).
        relieve_idle_s: KV pressure switches off engines idle this long (relieve_kv_pressure)."""
        if policy not in POLICIES:
            raise ValueError(f"memory policy {policy!r} is not one of {', '.join(POLICIES)}")
        self.device = device
        self.manager = manager
        self.policy_name = policy
        self._policy = POLICIES[policy]
        self.params = params
        self.reserve_bytes = default_reserve_bytes(device) if reserve_bytes is None else reserve_bytes
        # What the device's processes hold beyond the weights and KV counted here (measured_overhead_bytes):
        # (time, bytes) readings over OVERHEAD_SETTLE_S (and the last one before), and the least of them
        # at each reading over OVERHEAD_WINDOW_S, whose most is the overhead the reserve must cover.
        self._overhead_readings: deque[tuple[float, int]] = deque()
        self._overhead_settled: deque[tuple[float, int]] = deque()
        self.overhead_bytes = 0
        self.interval_s = interval_s
        self.kv_budget_cap_bytes = kv_budget_cap_bytes
        self.clock = clock
        self.make_room_idle_s = make_room_idle_s
        self.relieve_idle_s = relieve_idle_s
        self.recent_demand = RecentDemand(params.demand_hold_s)
        self.lock = asyncio.Lock()
        self._wake = asyncio.Event()
        # KV the agent's admission queue holds back for each model (queued, or
        # admitted and not yet in the engine's own numbers); set by admission.
        self.pending_demand_bytes: Callable[[str], int] = lambda model: 0
        # Ends the admission queue's waits for an engine switched off under them; how many (set by admission).
        self.send_back: Callable[[ManagedEngine, Exception], int] = lambda managed, error: 0
        self.on_limits_changed: Callable[[], None] = lambda: None
        self.plans = 0
        self.budget_violations = 0  # limits found summing over the budget after a change; stays 0

    # ---- what is on the device ---------------------------------------------------

    def engines(self) -> list[ManagedEngine]:
        """Every engine on this device, split ones (on several devices) included."""
        return [m for m in self.manager.engines.values() if self.device.index in m.gpu_ids]

    def _active(self, also: ManagedEngine | None = None) -> list[ManagedEngine]:
        return [m for m in self.engines() if m.engine is not None and (m.state == "active" or m is also)]

    def _switching_on(self, besides: ManagedEngine | None = None) -> list[ManagedEngine]:
        """Engines being switched on here (not yet active, their activation under way), but `besides`."""
        return [
            m
            for m in self.engines()
            if m.engine is not None and m.state == "inactive" and m.activation_lock.locked() and m is not besides
        ]

    def _arriving_bytes(self, besides: ManagedEngine | None = None) -> int:
        """What the engines being switched on here (but `besides`) hold or are about to: their weights,
        on their way onto the device, and the KV limit prepare_activation gave them, at least a page
        bundle. No plan or grant hands it to another engine until they are active and planned with the
        rest: the periodic plans and admission's grants that run during the copy (up to a second for an
        8B) used to count neither, and gave the memory the weights were landing in to the engines on."""
        return sum(
            self._taken_bytes(m) + (max(self._kv_floor_bytes(m), m.memory_limit_bytes) if self._plans(m) else 0)
            for m in self._switching_on(besides)
        )

    def _plans(self, m: ManagedEngine) -> bool:
        """Whether this device's policy sets the engine's limit: yes for an engine
        whose first device this is, unless its KV is fixed (a split built-in engine)."""
        return m.gpu_ids[0] == self.device.index and not m.fixed_kv

    def _planned(self, engines: list[ManagedEngine]) -> list[ManagedEngine]:
        return [m for m in engines if self._plans(m)]

    def _taken_bytes(self, m: ManagedEngine) -> int:
        """What an active engine holds here besides the KV planned here: its weights
        (a split engine's shard), and the limit of one whose KV is not planned here."""
        return m.started_engine.weight_bytes + (0 if self._plans(m) else m.memory_limit_bytes)

    def unit_bytes(self, engines: list[ManagedEngine]) -> int:
        # Each engine's limit is in its own page bundles; this unit is for an engine that reports none.
        return max(
            (m.started_engine.kv_bundle_bytes for m in engines if m.started_engine.kv_bundle_bytes > 0),
            default=DEFAULT_UNIT_BYTES,
        )

    def budget_bytes(self, active: list[ManagedEngine], arriving_bytes: int = 0) -> int:
        """The KV the engines planned here may share: the device less the weights (and unplanned KV) of
        `active`, what engines being switched on beside them hold (arriving_bytes), and the reserve."""
        taken = sum(self._taken_bytes(m) for m in active) + arriving_bytes
        budget = max(0, self.device.memory_bytes - taken - self.reserve_now())
        return min(budget, self.kv_budget_cap_bytes) if self.kv_budget_cap_bytes > 0 else budget

    def reserve_now(self) -> int:
        """Memory kept out of weights and KV: the configured reserve, or what the device's processes
        were measured to hold beyond them (plus a margin for the next activation's graphs and
        activations), whichever is more."""
        if not self.overhead_bytes:
            return self.reserve_bytes
        return max(self.reserve_bytes, self.overhead_bytes + OVERHEAD_MARGIN_BYTES)

    def measured_overhead_bytes(self) -> int | None:
        """The device's memory in use (every process's, as the engine workers read it) less the weights
        of the active engines and of those being switched on, and the KV every engine has mapped: CUDA
        contexts, graphs, activations, allocator caches, other processes. None where no engine reads
        the device (the CPU), and while an engine is loading here (its weights are on the device, in no
        count)."""
        every = self.engines()
        if any(m.state == "loading" for m in every):
            return None
        engines = [m for m in every if m.engine is not None]
        stats = [m.started_engine.stats() for m in engines]
        used = max((s.device_used_bytes for s in stats), default=0)
        if not used:
            return None
        counted = sum(self._taken_bytes(m) for m in self._active() + self._switching_on()) + sum(
            s.kv_mapped_bytes for s in stats
        )
        return max(0, used - counted)

    def observe_overhead(self) -> int:
        """Samples measured_overhead_bytes; overhead_bytes is the most, over OVERHEAD_WINDOW_S, of the
        readings that held for OVERHEAD_SETTLE_S. Counted as a reserve, the measurement keeps the budget
        within what the device has: on an H100 with 12 engine processes, 14-16 GB beyond weights and KV
        at rest and up to 26 GB serving (the processes hold more as they serve). The least over 3 s
        alone let engine steps and kvcached's page maps run the H100 out of memory as the processes
        grew; the most of every reading read 23-39 GB on that H100 (2026-12-06), whose engine readings
        are up to 100 ms old and so, for a moment after a switch, count weights no longer counted here:
        the budget fell to nothing and every request waited 20 s."""
        now = self.clock()
        measured = self.measured_overhead_bytes()
        readings, settled = self._overhead_readings, self._overhead_settled
        if measured is not None:
            readings.append((now, measured))
        while len(readings) > 1 and readings[1][0] <= now - OVERHEAD_SETTLE_S:
            readings.popleft()  # the one kept before the window is what held at its start
        if measured is not None and readings[0][0] <= now - OVERHEAD_SETTLE_S:
            settled.append((now, min(b for _, b in readings)))
        while settled and settled[0][0] < now - OVERHEAD_WINDOW_S:
            settled.popleft()
        self.overhead_bytes = max((b for _, b in settled), default=0)
        return self.overhead_bytes

    def demand_bytes(self, managed: ManagedEngine, stats: EngineStats | None = None) -> int:
        """stats: the engine's, when the caller has just read them."""
        stats = stats or managed.started_engine.stats()
        return stats.kv_demand_tokens * managed.started_engine.kv_bytes_per_token + self.pending_demand_bytes(
            managed.spec.name
        )

    def snapshot(self, also: ManagedEngine | None = None) -> DeviceMemorySnapshot:
        """The active engines (and `also`, about to be activated) as the policy sees them."""
        active = self._active(also)
        now = self.clock()
        engines = []
        overhang = 0
        for m in self._planned(active):
            stats = m.started_engine.stats()
            if m.state == "active":
                overhang += max(0, stats.kv_holding_bytes - m.memory_limit_bytes)
            demand = self.demand_bytes(m, stats)
            engines.append(
                EngineMemoryDemand(
                    model=m.spec.name,
                    priority=m.spec.slo.priority,
                    used_bytes=stats.kv_holding_bytes,
                    demand_bytes=demand,
                    limit_bytes=m.memory_limit_bytes if m.state == "active" else 0,
                    cap_bytes=m.cap_bytes,
                    unit_bytes=m.started_engine.kv_bundle_bytes,
                    recent_demand_bytes=self.recent_demand.observe(m.spec.name, now, demand),
                    cached_bytes=stats.kv_cached_bytes,
                )
            )
        self.recent_demand.forget_all_but({m.spec.name for m in active})
        # KV an engine still holds above its limit (a shrink it has not finished: its pages hold slots
        # of running sequences) is on the card, not in the budget, until it is given back: the limits
        # grown meanwhile out of it were memory no engine could map (H100, 2026-12-07: kvcached refused
        # about 400 shrinks in a 12-model run, while other engines waited for pages under their limits).
        return DeviceMemorySnapshot(
            budget_bytes=max(0, self.budget_bytes(active, self._arriving_bytes(besides=also)) - overhang),
            unit_bytes=self.unit_bytes(self._planned(active)),
            engines=tuple(engines),
        )

    def most_kv_bytes(self, managed: ManagedEngine) -> int:
        """The largest KV limit the engine could ever get here: the budget
        with only it active (others may switch off), within its cap."""
        if not self._plans(managed):
            return managed.memory_limit_bytes
        most = self.budget_bytes([managed]) if managed.engine is not None else 0
        return min(most, managed.cap_bytes) if managed.cap_bytes > 0 else most

    def _kv_floor_bytes(self, m: ManagedEngine) -> int:
        """The least KV limit this device's policy gives an active engine it
        plans: one page bundle (memory_policy.py)."""
        return m.started_engine.kv_bundle_bytes if self._plans(m) else 0

    def _kv_kept_bytes(self, m: ManagedEngine) -> int:
        """The KV an engine staying on keeps through another's activation (make_room.kv_kept_bytes);
        a split engine's fixed KV is in its taken bytes already."""
        if not self._plans(m):
            return 0
        # The engine's own demand, not what its admission queue holds back: a backlog there, unbounded
        # under overload, would keep every other model off (simulated, prism at 20 req/s, seed 4: 77.2%
        # within SLO counting the engine's demand, 68.3% counting the queue's too).
        stats = m.started_engine.stats()
        serving = m.request_stats.snapshot()
        arriving = arriving_tokens(serving.recent_arrival_rate, serving.mean_prompt_tokens, serving.mean_output_tokens)
        return kv_kept_bytes(
            self._kv_floor_bytes(m),
            stats.kv_holding_bytes,
            stats.kv_demand_tokens * m.started_engine.kv_bytes_per_token,
            arriving * m.started_engine.kv_bytes_per_token,
        )

    def room_to_activate(self, activating: ManagedEngine) -> list[str] | None:
        """The active engines to switch off, longest idle first and only those
        with nothing to serve and no request for make_room_idle_s, so that
        `activating`'s weights fit beside the others' and the reserve, with
        room left for every engine planned here to get its least KV limit
        and for the KV the others' requests hold (make_room.kv_kept_bytes);
        [] when they fit, None when they cannot be made to. Without that KV
        floor an engine could be switched on whose policy share is nothing
        while the others are busy: its requests would wait for as long as the
        others' load lasts."""
        others = [m for m in self._active() if m is not activating]
        kept = {m.spec.name: self._kv_kept_bytes(m) for m in others}
        # Another activation under way needs its room too (the scheduler activates models concurrently:
        # on the H100 two did, each counted room the other then took, and both ran out of memory).
        arriving = self._arriving_bytes(besides=activating)
        free = self.device.memory_bytes - self.reserve_now() - sum(self._taken_bytes(m) for m in others) - arriving
        residents = [self._resident(m, kept[m.spec.name]) for m in others]
        need = self._taken_bytes(activating) + self._kv_floor_bytes(activating)
        room = engines_to_switch_off(residents, need, free - sum(kept.values()), self.make_room_idle_s)
        if room is None or self.kv_budget_cap_bytes <= 0:
            return room
        # The cap bounds the KV alone: the KV the engines left on keep must fit under it as well.
        staying = [replace(r, weight_bytes=kept[r.model]) for r in residents if r.model not in room]
        more = engines_to_switch_off(
            staying,
            self._kv_floor_bytes(activating),
            self.kv_budget_cap_bytes - sum(r.weight_bytes for r in staying),
            self.make_room_idle_s,
        )
        return None if more is None else room + more

    def _resident(self, m: ManagedEngine, extra_bytes: int = 0) -> ResidentEngine:
        """An active engine as make_room.py sees it: what switching it off frees here (plus
        extra_bytes), how long since its last request, whether a request runs or waits in it."""
        stats = m.started_engine.stats()
        serving = (
            stats.running_requests + stats.queued_requests > 0
            or m.request_stats.in_flight > 0
            or self.pending_demand_bytes(m.spec.name) > 0
        )
        return ResidentEngine(
            model=m.spec.name,
            weight_bytes=self._taken_bytes(m) + extra_bytes,
            idle_s=m.request_stats.idle_s(),
            serving=serving,
        )

    def _resident_under_pressure(self, m: ManagedEngine) -> ResidentEngine:
        """_resident with what make_room.engine_to_yield weighs besides: its recent rate, whether a request
        waits, how many are in flight, its priority (read only here: the rate is a stats snapshot)."""
        stats = m.started_engine.stats()
        return replace(
            self._resident(m),
            recent_rate=m.request_stats.snapshot().recent_arrival_rate,
            waiting=stats.queued_requests > 0 or self.pending_demand_bytes(m.spec.name) > 0,
            in_flight=m.request_stats.in_flight,
            priority=m.slo.priority,
        )

    async def relieve_kv_pressure(self) -> list[str]:
        """Balloon policy: when the active engines' KV demand exceeds the budget, idle engines (nothing
        to serve for relieve_idle_s, longest idle first) are switched off until their weights cover
        the shortfall (make_room.engines_to_relieve); with none idle, an engine with a trickle of
        requests beside a busy one is, its requests failing (make_room.engine_to_yield). Returns the
        models switched off. Static partitions keep their engines on: their split is the operator's."""
        if self.policy_name != "balloon":
            return []
        shortfall = kv_shortfall_bytes(self.snapshot())
        if shortfall <= 0:
            return []
        residents = [self._resident_under_pressure(m) for m in self._planned(self._active())]
        chosen = engines_to_relieve(residents, shortfall, self.relieve_idle_s)
        for model in chosen:
            log.info(
                "switching %s off: idle, while the engines serving on device %d need %.0f MiB more KV than it has",
                model,
                self.device.index,
                shortfall / 2**20,
            )
            await self.manager.deactivate(model)
        if not chosen:
            trickle = engine_to_yield(residents)
            if trickle is not None:
                await self._switch_off_for_busier(next(r for r in residents if r.model == trickle), shortfall)
                chosen = [trickle]
        if chosen:
            await self.rebalance()
        return chosen

    async def _switch_off_for_busier(self, trickle: ResidentEngine, shortfall: int) -> None:
        """Switches off an engine that serves a trickle (engine_to_yield): its requests waiting for
        admission and those running end with RESOURCE_EXHAUSTED saying why (ManagedEngine.switched_off_why)."""
        managed = self.manager.ready(trickle.model)
        why = (
            f"model {trickle.model!r} was switched off on device {self.device.index} while serving: its requests "
            f"arrive at {trickle.recent_rate:.2f}/s, and the busier engines there need {shortfall / 2**20:.1f} MiB "
            "more KV than the device has; it is switched on again when a request finds room"
        )
        log.warning("switching %s off though it serves: %s", trickle.model, why)
        managed.switched_off_why = why
        self.send_back(managed, CapacityError(why))
        await self.manager.deactivate(trickle.model)

    def no_room_error(self, activating: ManagedEngine) -> CapacityError:
        others = [m for m in self._active() if m is not activating]
        taken = sum(self._taken_bytes(m) for m in others)
        floors = sum(self._kv_floor_bytes(m) for m in others + [activating])
        held = sum(self._kv_kept_bytes(m) - self._kv_floor_bytes(m) for m in others)
        cap = (
            f", the KV budget capped at {self.kv_budget_cap_bytes / 2**20:.1f} MiB" if self.kv_budget_cap_bytes else ""
        )
        return CapacityError(
            f"model {activating.spec.name!r} cannot be switched on now: its weights "
            f"({self._taken_bytes(activating) / 2**20:.0f} MiB) and one KV page bundle for each engine "
            f"({floors / 2**20:.1f} MiB together) do not fit on device {self.device.index} beside "
            f"the KV the active engines' requests hold or need soon, and their next second of arrivals will, "
            f"beyond that ({held / 2**20:.0f} MiB) and "
            f"their weights ({taken / 2**20:.0f} MiB of {self.device.memory_bytes / 2**20:.0f} MiB, "
            f"{self.reserve_now() / 2**20:.0f} MiB kept in reserve{cap}), and none of them has been idle "
            f"{self.make_room_idle_s:g} s to step aside"
        )

    async def prepare_activation(self, activating: ManagedEngine) -> None:
        """Before an engine is switched on (the engine manager's
        before_activate): idle engines step aside if its weights would not fit
        (room_to_activate), then the others' KV limits make room and it gets
        its own (a split engine: on each of its devices, prepare_activation_on).
        With no room to make, nothing is switched off and it fails at
        once with CapacityError (RESOURCE_EXHAUSTED), rather than copying
        weights into memory the active engines hold (out of memory on a GPU;
        on the CPU device, an engine with no KV budget whose requests wait for
        their deadlines)."""
        room = self.room_to_activate(activating)
        if room is None:
            raise self.no_room_error(activating)
        for model in room:
            log.info(
                "switching %s off to make room for %s (its weights and a page bundle of KV each)",
                model,
                activating.spec.name,
            )
            await self.manager.deactivate(model)
        await self.rebalance(activating=activating)

    def memory_split(self) -> DeviceMemorySplit:
        engines = self.engines()
        active = self._active()
        budget = self.budget_bytes(active, self._arriving_bytes())
        rows = []
        for m in engines:
            stats = m.engine.stats() if m.engine is not None else None
            on = m in active
            # A split engine's demand is counted once, on its first device (demand_by_model sums devices).
            counted_here = on and m.gpu_ids[0] == self.device.index
            rows.append(
                EngineMemory(
                    model=m.spec.name,
                    active=on,
                    weight_bytes=m.engine.weight_bytes if m.engine is not None else 0,
                    kv_limit_bytes=m.memory_limit_bytes if on else 0,
                    kv_mapped_bytes=stats.kv_mapped_bytes if stats else 0,
                    kv_used_bytes=stats.kv_used_bytes if stats else 0,
                    kv_demand_bytes=self.demand_bytes(m, stats) if counted_here else 0,
                    kv_held_bytes=stats.kv_holding_bytes if stats else 0,
                    kv_cached_bytes=stats.kv_cached_bytes if stats else 0,
                )
            )
        # Limits not planned here count in both the budget and the limits (budget_bytes leaves them out).
        budget += sum(m.memory_limit_bytes for m in active if not self._plans(m))
        limits = sum(r.kv_limit_bytes for r in rows)
        return DeviceMemorySplit(
            gpu_id=self.device.index,
            total_bytes=self.device.memory_bytes,
            weight_bytes=sum(m.started_engine.weight_bytes for m in active),
            reserve_bytes=self.reserve_now(),
            kv_budget_bytes=budget,
            kv_limit_bytes=limits,
            kv_mapped_bytes=sum(r.kv_mapped_bytes for r in rows),
            free_bytes=budget - limits,
            engines=tuple(rows),
        )

    # ---- changing limits ---------------------------------------------------------

    def poke(self) -> None:
        """Re-plan now rather than at the next interval."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval_s)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.rebalance()
                await self.relieve_kv_pressure()
            except Exception:  # one bad plan must not stop the coordinator
                log.exception("memory coordinator of device %d: re-planning failed", self.device.index)

    async def rebalance(self, activating: ManagedEngine | None = None) -> dict[str, int]:
        """Plans and applies new limits; `activating`: an inactive engine about
        to be switched on, counted (weights and a limit) as if it were active,
        so the others make room before its weights arrive."""
        async with self.lock:
            self.observe_overhead()
            snapshot = self.snapshot(also=activating)
            plan = self._policy(snapshot, self.params)
            self.plans += 1
            await self._apply(plan, skip=activating)
            self._check(snapshot.budget_bytes)
        return plan

    async def grant(self, managed: ManagedEngine, need_bytes: int) -> bool:
        """Raises the engine's limit by need_bytes (whole units) at once if
        that much of the budget is unassigned; False otherwise."""
        async with self.lock:
            if managed.state != "active" or managed.engine is None or not self._plans(managed):
                return False
            snapshot = self.snapshot()
            new_limit = grant(snapshot, managed.spec.name, need_bytes)
            if new_limit is None and self.policy_name == "balloon":
                # Not unassigned: taken from other engines' prefix caches, given back at once.
                lowered = cache_to_free(snapshot, managed.spec.name, need_bytes)
                for model, nbytes in (lowered or {}).items():
                    await self._set(model, nbytes)
                if lowered:
                    snapshot = self.snapshot()
                    new_limit = grant(snapshot, managed.spec.name, need_bytes)
            if new_limit is None:
                return False
            ok = await self._set(managed.spec.name, new_limit)
            self._check(snapshot.budget_bytes)
        if ok:
            self.on_limits_changed()
        return ok

    async def _apply(self, plan: dict[str, int], skip: ManagedEngine | None) -> None:
        current = {m.spec.name: m.memory_limit_bytes for m in self._planned(self._active())}
        shrinks = [(model, nbytes) for model, nbytes in plan.items() if model in current and nbytes < current[model]]
        grows = [
            (model, nbytes)
            for model, nbytes in plan.items()
            if model in current and nbytes > current[model] and (skip is None or model != skip.spec.name)
        ]
        for model, nbytes in shrinks:
            await self._set(model, nbytes)
        for model, nbytes in grows:
            await self._set(model, nbytes)
        if skip is not None and skip.spec.name in plan:
            # Set while inactive: the engine takes it on activation (the limit outlives deactivation).
            await self._set(skip.spec.name, plan[skip.spec.name], inactive_ok=True)
        if grows or shrinks:
            log.debug(
                "device %d limits: %s", self.device.index, ", ".join(f"{m} {b >> 20} MiB" for m, b in plan.items())
            )
            self.on_limits_changed()

    async def _set(self, model: str, nbytes: int, inactive_ok: bool = False) -> bool:
        try:
            managed = self.manager.ready(model)
            if managed.state != "active" and not inactive_ok:
                return False
            await self.manager.set_memory_limit(model, max(1, nbytes), 0)
            return True
        except (ModelNotLoadedError, EngineNotReadyError, EngineError) as exc:  # gone or failed meanwhile
            log.warning("setting the KV limit of %s to %d bytes failed: %s", model, nbytes, exc)
            return False

    def _check(self, budget: int) -> None:
        total = sum(m.memory_limit_bytes for m in self._planned(self._active()))
        if total > budget:
            self.budget_violations += 1
            log.error("device %d: KV limits sum to %d bytes, over the budget of %d", self.device.index, total, budget)


async def prepare_activation_on(coordinators: Sequence[MemoryCoordinator], activating: ManagedEngine) -> None:
    """prepare_activation on every device of the engine (a split engine spans
    several): each device is checked first, so that no engine is switched off
    on one device for an activation that another device then refuses."""
    for coordinator in coordinators:
        if coordinator.room_to_activate(activating) is None:
            raise coordinator.no_room_error(activating)
    for coordinator in coordinators:
        await coordinator.prepare_activation(activating)
