"""How much KV memory each engine on one device may hold: pure functions of a
snapshot, so tests (and a simulator) run exactly what the agent runs.

The device's KV budget is its memory less the active engines' weights and a
reserve. Two policies share the interface `(snapshot, params) -> {model: limit}`:

- `balloon` (Prism's): each engine wants its demand (the KV its running and
  queued requests hold or will need soon), then a little headroom from what
  no demand needs. While the wants fit the budget every engine gets its want
  and the rest stays unassigned, so an arrival burst can be granted memory at
  once (see `grant`). When they do not fit, the budget is split by weighted
  max-min fairness (water-filling, weights = priorities): no engine gets more
  than it wants, and memory flows from idle and low-priority engines to busy
  ones — an engine holding more than its share is cut to it and preempts its
  newest requests. Small changes are left alone (hysteresis), so limits do not
  flap; small is relative to the budget, so a budget of a few units still moves.
  Headroom also covers an engine's recent peak of demand (`RecentDemand`, over
  `demand_hold_s`): a bursting model whose requests end and arrive keeps its
  memory between them instead of giving it back and taking it again, yet only
  from what no demand needs, so another engine's demand still takes it at once.
- `static`: the budget split equally among the active engines, whatever the
  demand; the baseline the balloon is measured against.

Every limit is a whole number of the engine's own unit (its page bundle: what
one page per layer of K and V holds; engines of different models differ), at
least one unit, and never above the engine's cap; the limits never sum to
more than the budget.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineMemoryDemand:
    model: str
    priority: int  # weight under contention, >= 1
    used_bytes: int  # KV its requests hold now: the pages it is on, whole (EngineStats.kv_holding_bytes)
    demand_bytes: int  # KV its running and queued requests hold or will need soon
    limit_bytes: int  # its limit now
    cap_bytes: int = 0  # most it may ever get (the config's max_memory_pool_size); 0: no cap
    unit_bytes: int = 0  # its limit's granularity (its page bundle); 0: the snapshot's
    recent_demand_bytes: int = 0  # the most demand it showed over the last demand_hold_s (RecentDemand)
    cached_bytes: int = 0  # KV only its prefix cache keeps (neither used nor demand): kept where nothing needs it


@dataclass(frozen=True)
class DeviceMemorySnapshot:
    budget_bytes: int  # what the KV limits may sum to
    unit_bytes: int  # an engine's limit granularity where the engine does not give its own
    engines: tuple[EngineMemoryDemand, ...]  # the active engines on the device

    def unit_of(self, engine: EngineMemoryDemand) -> int:
        return engine.unit_bytes or self.unit_bytes


@dataclass(frozen=True)
class PolicyParams:
    headroom_units: int = 2  # granted beyond demand from what no demand needs, so a few arrivals need no grant
    # A change of at most this many units is not made, unless demand or the budget
    # needs it; at most an eighth of the budget, so a small budget still moves.
    hysteresis_units: int = 2
    # How long an engine's peak demand is remembered (RecentDemand) and kept in its
    # headroom: about a request's lifetime, so a burst's gaps between requests do not
    # give memory back; a tenth of it would re-plan at every request end.
    demand_hold_s: float = 1.0


class RecentDemand:
    """The most demand each engine showed over a sliding window of time: what
    the coordinator (and the simulator) put in `recent_demand_bytes`. A sliding
    maximum over a deque of samples whose demands fall from front to back."""

    def __init__(self, window_s: float):
        self.window_s = window_s
        self._samples: dict[str, deque[tuple[float, int]]] = {}

    def observe(self, model: str, now: float, demand_bytes: int) -> int:
        """Records the engine's demand now; returns its peak over the window."""
        samples = self._samples.setdefault(model, deque())
        while samples and samples[-1][1] <= demand_bytes:
            samples.pop()  # never the maximum again: a newer sample is at least as large
        samples.append((now, demand_bytes))
        while samples[0][0] < now - self.window_s:
            samples.popleft()
        return samples[0][1]

    def forget_all_but(self, models: set[str]) -> None:
        for model in set(self._samples) - models:
            del self._samples[model]


MemoryPolicy = Callable[[DeviceMemorySnapshot, PolicyParams], dict[str, int]]


def _units_up(nbytes: int, unit: int) -> int:
    return -(-max(0, nbytes) // unit)


def _cap_units(engine: EngineMemoryDemand, unit: int) -> int | None:
    return max(1, engine.cap_bytes // unit) if engine.cap_bytes > 0 else None


def water_fill(
    wants: dict[str, int],
    weights: dict[str, int],
    total: int,
    floor: int = 1,
    units: dict[str, int] | None = None,
    start: dict[str, int] | None = None,
) -> dict[str, int]:
    """Splits `total` bytes by weighted max-min fairness, in whole units per
    key (`units`, default 1): each key gets at least `floor` units (if the
    total allows; highest weights first otherwise), no more than its want
    (units), and what one does not want goes to the others, one unit at a time
    to the key with the least bytes per weight whose next unit still fits.
    `start`: units already granted (a second round fills on top). Returns
    units per key; their bytes never sum to more than `total`."""
    units = units or dict.fromkeys(wants, 1)
    grant = dict(start) if start is not None else {}
    if start is None:
        left = total
        for k in sorted(wants, key=lambda k: (-weights[k], k)):
            grant[k] = min(floor, wants[k]) if min(floor, wants[k]) * units[k] <= left else 0
            left -= grant[k] * units[k]
    left = total - sum(grant[k] * units[k] for k in grant)
    heap = [(grant[k] * units[k] / weights[k], k) for k in wants if wants[k] > grant[k]]
    heapq.heapify(heap)
    while heap:
        _, k = heapq.heappop(heap)
        if units[k] > left:
            continue  # its next unit does not fit; a key of smaller units still may
        grant[k] += 1
        left -= units[k]
        if grant[k] < wants[k]:
            heapq.heappush(heap, (grant[k] * units[k] / weights[k], k))
    return grant


def plan_balloon(snapshot: DeviceMemorySnapshot, params: PolicyParams = PolicyParams()) -> dict[str, int]:
    total = snapshot.budget_bytes
    demand, roomy, weights, units, caps = {}, {}, {}, {}, {}
    for e in snapshot.engines:
        unit = units[e.model] = snapshot.unit_of(e)
        cap = caps[e.model] = _cap_units(e, unit)
        need = _units_up(max(e.demand_bytes, e.used_bytes), unit)
        demand[e.model] = min(need, cap) if cap is not None else need
        held = max(need, _units_up(e.recent_demand_bytes, unit)) + params.headroom_units
        roomy[e.model] = max(1, min(held, cap) if cap is not None else held)
        weights[e.model] = max(1, e.priority)
    # Demand first (max-min fair by priority), then headroom from what is left:
    # an idle engine's headroom never holds back a busy one's requests. Last, each engine's prefix
    # cache from what is left still: kept while no demand needs its memory, the first to go when one does.
    plan = water_fill({m: max(1, d) for m, d in demand.items()}, weights, total, units=units)
    plan = water_fill(roomy, weights, total, units=units, start=plan)
    cached: dict[str, int] = {}
    for e in snapshot.engines:
        keep = roomy[e.model] + _units_up(e.cached_bytes, units[e.model]) if e.cached_bytes else roomy[e.model]
        cap = caps[e.model]
        cached[e.model] = min(keep, cap) if cap is not None else keep
    plan = water_fill(cached, weights, total, units=units, start=plan)
    # Hysteresis: keep a limit close to the plan. Keeping a smaller one only
    # while it covers the demand; keeping a larger one only while the budget has room.
    current = {e.model: e.limit_bytes // units[e.model] for e in snapshot.engines}
    slack = {m: min(params.hysteresis_units, total // units[m] // 8) for m in plan}
    for model, n in plan.items():
        now = current[model]
        if 1 <= now < n and n - now <= slack[model] and now >= demand[model]:
            plan[model] = now
    for model, n in plan.items():
        now, cap = current[model], caps[model]
        used = sum(plan[m] * units[m] for m in plan)
        if (
            n < now
            and now - n <= slack[model]
            and (cap is None or now <= cap)
            and used + (now - n) * units[model] <= total
        ):
            plan[model] = now
    return {model: n * units[model] for model, n in plan.items()}


def kv_shortfall_bytes(snapshot: DeviceMemorySnapshot) -> int:
    """How much more KV the active engines' demand (what their running and
    queued requests hold or will need soon, within each one's cap, in whole
    units) needs than the device's budget holds; 0 when the budget covers it."""
    wanted = 0
    for e in snapshot.engines:
        unit = snapshot.unit_of(e)
        need = _units_up(max(e.demand_bytes, e.used_bytes), unit)
        cap = _cap_units(e, unit)
        wanted += (min(need, cap) if cap is not None else need) * unit
    return max(0, wanted - snapshot.budget_bytes)


def cache_to_free(snapshot: DeviceMemorySnapshot, model: str, need_bytes: int) -> dict[str, int] | None:
    """For a grant to `model` of need_bytes that the unassigned budget does not cover: lower limits of
    the other engines that only their prefix caches fill beyond what their requests hold and need, largest
    cache first, enough to cover the rest. Returns those engines' new limits ({} if the unassigned budget
    already covers it), or None if their caches cannot."""
    engine = next((e for e in snapshot.engines if e.model == model), None)
    if engine is None:
        return None
    short = _units_up(need_bytes, snapshot.unit_of(engine)) * snapshot.unit_of(engine) - (
        snapshot.budget_bytes - sum(e.limit_bytes for e in snapshot.engines)
    )
    lowered: dict[str, int] = {}
    for other in sorted(
        (e for e in snapshot.engines if e.model != model and e.cached_bytes > 0),
        key=lambda e: (-e.cached_bytes, e.model),
    ):
        if short <= 0:
            break
        unit = snapshot.unit_of(other)
        spare = min(other.cached_bytes, other.limit_bytes - max(other.used_bytes, other.demand_bytes)) // unit
        take = min(max(0, spare), _units_up(short, unit), other.limit_bytes // unit - 1)
        if take > 0:
            lowered[other.model] = other.limit_bytes - take * unit
            short -= take * unit
    return lowered if short <= 0 else None


def plan_static(snapshot: DeviceMemorySnapshot, params: PolicyParams = PolicyParams()) -> dict[str, int]:
    if not snapshot.engines:
        return {}
    share_bytes = max(0, snapshot.budget_bytes // len(snapshot.engines))
    out = {}
    for e in snapshot.engines:
        unit = snapshot.unit_of(e)
        cap = _cap_units(e, unit)
        share = share_bytes // unit
        out[e.model] = (min(share, cap) if cap is not None else share) * unit
    return out


POLICIES: dict[str, MemoryPolicy] = {"balloon": plan_balloon, "static": plan_static}


def grant(snapshot: DeviceMemorySnapshot, model: str, need_bytes: int) -> int | None:
    """The new limit that gives `model` `need_bytes` more than it can use now,
    taken from the budget no engine holds; None if that much is not free (the
    next plan will decide). Its cap still applies."""
    engine = next((e for e in snapshot.engines if e.model == model), None)
    if engine is None:
        return None
    unit = snapshot.unit_of(engine)
    free = snapshot.budget_bytes - sum(e.limit_bytes for e in snapshot.engines)
    extra = _units_up(need_bytes, unit) * unit
    new_limit = (engine.limit_bytes // unit) * unit + extra
    if extra > free or (engine.cap_bytes > 0 and new_limit > max(unit, engine.cap_bytes // unit * unit)):
        return None
    return new_limit
