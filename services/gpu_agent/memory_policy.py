"""How much KV memory each engine on one device may hold: pure functions of a
snapshot, so tests (and a simulator) run exactly what the agent runs.

The device's KV budget is its memory less the active engines' weights and a
reserve. Two policies share the interface `(snapshot, params) -> {model: limit}`:

- `balloon` (Prism's): each engine wants its demand (the KV its running and
  queued requests hold or will need soon) plus a little headroom. While the
  wants fit the budget every engine gets its want and the rest stays
  unassigned, so an arrival burst can be granted memory at once (see
  `grant`). When they do not fit, the budget is split by weighted max-min
  fairness (water-filling, weights = priorities): no engine gets more than it
  wants, and memory flows from idle and low-priority engines to busy ones —
  an engine holding more than its share is cut to it and preempts its newest
  requests. Small changes are left alone (hysteresis), so limits do not flap.
- `static`: the budget split equally among the active engines, whatever the
  demand; the baseline the balloon is measured against.

Every limit is a whole number of `unit_bytes` (a page bundle: what one page
per layer of K and V holds), at least one unit, and never above the engine's
cap; the limits never sum to more than the budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineMemoryDemand:
    model: str
    priority: int  # weight under contention, >= 1
    used_bytes: int  # KV its requests hold now
    demand_bytes: int  # KV its running and queued requests hold or will need soon
    limit_bytes: int  # its limit now
    cap_bytes: int = 0  # most it may ever get (the config's max_memory_pool_size); 0: no cap


@dataclass(frozen=True)
class DeviceMemorySnapshot:
    budget_bytes: int  # what the KV limits may sum to
    unit_bytes: int  # limits are whole multiples of this
    engines: tuple[EngineMemoryDemand, ...]  # the active engines on the device


@dataclass(frozen=True)
class PolicyParams:
    headroom_units: int = 2  # granted beyond demand, so a few arrivals need no new grant
    hysteresis_units: int = 2  # a change of at most this many units is not made, unless the budget needs it


MemoryPolicy = Callable[[DeviceMemorySnapshot, PolicyParams], dict[str, int]]


def _units_up(nbytes: int, unit: int) -> int:
    return -(-max(0, nbytes) // unit)


def _cap_units(engine: EngineMemoryDemand, unit: int) -> int | None:
    return max(1, engine.cap_bytes // unit) if engine.cap_bytes > 0 else None


def water_fill(wants: dict[str, int], weights: dict[str, int], total: int, floor: int = 1) -> dict[str, int]:
    """Splits `total` units by weighted max-min fairness: each key gets at
    least `floor` (if the total allows), no more than its want, and whatever
    one does not want goes to the others in proportion to their weights.
    Integer units; the result never sums to more than `total`."""
    grant = {k: min(floor, w) for k, w in wants.items()}
    if sum(grant.values()) > total:  # not even the floors fit: highest weights first
        grant = dict.fromkeys(wants, 0)
        left = total
        for k in sorted(wants, key=lambda k: (-weights[k], k)):
            grant[k] = min(floor, wants[k], left)
            left -= grant[k]
        return grant
    left = total - sum(grant.values())
    hungry = {k for k in wants if wants[k] > grant[k]}
    while left > 0 and hungry:
        weight_sum = sum(weights[k] for k in hungry)
        shares = {k: left * weights[k] // weight_sum for k in hungry}
        if not any(shares.values()):  # fewer units left than hungry keys: one each, highest weight first
            for k in sorted(hungry, key=lambda k: (-weights[k], k))[:left]:
                grant[k] += 1
            break
        for k in list(hungry):
            give = min(shares[k], wants[k] - grant[k])
            grant[k] += give
            left -= give
            if grant[k] >= wants[k]:
                hungry.discard(k)
    return grant


def plan_balloon(snapshot: DeviceMemorySnapshot, params: PolicyParams = PolicyParams()) -> dict[str, int]:
    unit = snapshot.unit_bytes
    total = snapshot.budget_bytes // unit
    wants, weights, caps = {}, {}, {}
    for e in snapshot.engines:
        want = _units_up(max(e.demand_bytes, e.used_bytes), unit) + params.headroom_units
        cap = _cap_units(e, unit)
        wants[e.model] = max(1, min(want, cap) if cap is not None else want)
        weights[e.model] = max(1, e.priority)
        caps[e.model] = cap
    plan = water_fill(wants, weights, total)
    # Hysteresis: keep a limit that is close to the plan. Keeping a smaller one
    # costs nothing; keeping a larger one only while the budget has room.
    current = {e.model: e.limit_bytes // unit for e in snapshot.engines}
    for model, units in plan.items():
        now = current[model]
        if 1 <= now < units and units - now <= params.hysteresis_units:
            plan[model] = now
    for model, units in plan.items():
        now = current[model]
        cap = caps[model]
        if units < now and now - units <= params.hysteresis_units and (cap is None or now <= cap) \
                and sum(plan.values()) - units + now <= total:
            plan[model] = now
    return {model: units * unit for model, units in plan.items()}


def plan_static(snapshot: DeviceMemorySnapshot, params: PolicyParams = PolicyParams()) -> dict[str, int]:
    unit = snapshot.unit_bytes
    if not snapshot.engines:
        return {}
    share = max(0, snapshot.budget_bytes // unit // len(snapshot.engines))
    out = {}
    for e in snapshot.engines:
        cap = _cap_units(e, unit)
        out[e.model] = (min(share, cap) if cap is not None else share) * unit
    return out


POLICIES: dict[str, MemoryPolicy] = {"balloon": plan_balloon, "static": plan_static}


def grant(snapshot: DeviceMemorySnapshot, model: str, need_bytes: int) -> int | None:
    """The new limit that gives `model` `need_bytes` more than it can use now,
    taken from the budget no engine holds; None if that much is not free (the
    next plan will decide). Its cap still applies."""
    unit = snapshot.unit_bytes
    engine = next((e for e in snapshot.engines if e.model == model), None)
    if engine is None:
        return None
    free = snapshot.budget_bytes - sum(e.limit_bytes for e in snapshot.engines)
    extra = _units_up(need_bytes, unit) * unit
    new_limit = (engine.limit_bytes // unit) * unit + extra
    if extra > free or (engine.cap_bytes > 0 and new_limit > max(unit, engine.cap_bytes // unit * unit)):
        return None
    return new_limit
