"""The memory policies on hand-built snapshots: pure functions, no engines."""

from __future__ import annotations

import random

import pytest

from services.gpu_agent.memory_policy import (
    DeviceMemorySnapshot,
    EngineMemoryDemand,
    PolicyParams,
    RecentDemand,
    cache_to_free,
    grant,
    plan_balloon,
    plan_static,
    water_fill,
)

UNIT = 1 << 20  # 1 MiB page bundles
PARAMS = PolicyParams(headroom_units=2, hysteresis_units=2)


def engine(model, *, demand=0, used=0, limit=0, priority=1, cap=0, recent=0, cached=0):
    return EngineMemoryDemand(
        model=model,
        priority=priority,
        used_bytes=used * UNIT,
        demand_bytes=demand * UNIT,
        limit_bytes=limit * UNIT,
        cap_bytes=cap * UNIT,
        recent_demand_bytes=recent * UNIT,
        cached_bytes=cached * UNIT,
    )


def snapshot(budget_units, *engines):
    return DeviceMemorySnapshot(budget_bytes=budget_units * UNIT, unit_bytes=UNIT, engines=tuple(engines))


def units(plan):
    return {m: b // UNIT for m, b in plan.items()}


def test_wants_that_fit_are_granted_and_the_rest_stays_free():
    plan = units(plan_balloon(snapshot(100, engine("a", demand=10), engine("b", demand=0)), PARAMS))
    assert plan == {"a": 12, "b": 2}  # demand + headroom; 86 units unassigned for bursts


def test_a_burst_takes_memory_from_an_idle_engine():
    # b held a large limit while busy; now a bursts and b is idle.
    plan = units(plan_balloon(snapshot(100, engine("a", demand=90, limit=10), engine("b", demand=0, limit=90)), PARAMS))
    assert plan["a"] == 92 and plan["b"] == 2
    assert sum(plan.values()) <= 100


def test_contention_splits_by_priority_and_cuts_the_engine_over_its_share():
    plan = units(
        plan_balloon(
            snapshot(
                90,
                engine("hi", demand=100, used=30, limit=30, priority=2),
                engine("lo", demand=100, used=60, limit=60, priority=1),
            ),
            PARAMS,
        )
    )
    assert plan == {"hi": 60, "lo": 30}  # 2:1, and lo preempts down to 30


def test_one_engine_wanting_little_leaves_the_rest_to_the_others():
    plan = units(
        plan_balloon(snapshot(100, engine("a", demand=8), engine("b", demand=500), engine("c", demand=500)), PARAMS)
    )
    assert plan == {"a": 8, "b": 46, "c": 46}  # under contention demand comes first, headroom only from what is left


MIB = 1 << 20


def sized(model, unit_mib, *, demand=0, limit=0, priority=1):
    return EngineMemoryDemand(
        model=model,
        priority=priority,
        used_bytes=0,
        demand_bytes=demand * MIB,
        limit_bytes=limit * MIB,
        unit_bytes=unit_mib * MIB,
    )


def test_engines_of_different_page_bundles_get_whole_bundles_of_their_own():
    # The H100 ballooning bench's device: a 1B (64 MiB bundles) and a 3B (112 MiB) on 512 MiB.
    # The 1B bursts while the 3B, holding three bundles, has gone idle.
    snap = DeviceMemorySnapshot(
        budget_bytes=512 * MIB,
        unit_bytes=112 * MIB,
        engines=(sized("1b", 64, demand=300, limit=64), sized("3b", 112, demand=0, limit=336)),
    )
    plan = {m: b // MIB for m, b in plan_balloon(snap, PARAMS).items()}
    # The 3B keeps one bundle; the 1B gets its 5 bundles of demand and one of headroom
    # (on 4 to 8 bundles of budget, a hysteresis of 2 would freeze every limit).
    assert plan == {"1b": 384, "3b": 112}
    assert plan["1b"] % 64 == 0 and plan["3b"] % 112 == 0 and sum(plan.values()) <= 512
    # Then the 3B bursts: the 1B, now idle, gives it back.
    snap = DeviceMemorySnapshot(
        budget_bytes=512 * MIB,
        unit_bytes=112 * MIB,
        engines=(sized("1b", 64, demand=0, limit=384), sized("3b", 112, demand=400, limit=112)),
    )
    plan = {m: b // MIB for m, b in plan_balloon(snap, PARAMS).items()}
    assert plan == {"1b": 64, "3b": 448}
    # Static: equal bytes, in whole bundles of each.
    plan = {m: b // MIB for m, b in plan_static(snap, PARAMS).items()}
    assert plan == {"1b": 256, "3b": 224}


def test_water_fill_in_units_of_different_sizes_is_fair_in_bytes():
    got = water_fill({"small": 100, "big": 100}, {"small": 1, "big": 1}, 600, units={"small": 10, "big": 30})
    assert got["small"] * 10 + got["big"] * 30 <= 600
    assert abs(got["small"] * 10 - got["big"] * 30) <= 30  # equal bytes, to within a unit
    # A key whose next unit does not fit leaves the rest to one with smaller units.
    got = water_fill({"small": 100, "big": 100}, {"small": 1, "big": 1}, 65, units={"small": 10, "big": 30})
    assert got == {"small": 3, "big": 1}  # after the floors, 25 left: big's 30 never fits, small takes 20


def test_grant_is_in_the_engines_own_units():
    snap = DeviceMemorySnapshot(
        budget_bytes=512 * MIB, unit_bytes=112 * MIB, engines=(sized("1b", 64, limit=64), sized("3b", 112, limit=112))
    )
    assert grant(snap, "1b", 1) == 128 * MIB
    assert grant(snap, "3b", 1) == 224 * MIB


def test_caps_apply():
    plan = units(plan_balloon(snapshot(100, engine("a", demand=80, cap=20), engine("b", demand=10)), PARAMS))
    assert plan == {"a": 20, "b": 12}


def test_every_engine_keeps_one_unit_even_when_the_budget_is_tiny():
    plan = units(
        plan_balloon(snapshot(3, engine("a", demand=50), engine("b", demand=50), engine("c", demand=50)), PARAMS)
    )
    assert plan == {"a": 1, "b": 1, "c": 1}
    plan = units(
        plan_balloon(
            snapshot(
                2,
                engine("a", demand=50, priority=1),
                engine("b", demand=50, priority=3),
                engine("c", demand=50, priority=2),
            ),
            PARAMS,
        )
    )
    assert plan == {"a": 0, "b": 1, "c": 1}  # not even the floors fit: highest priorities keep theirs


def test_small_changes_are_not_made():
    # Demand moved by one unit either way: the limits stay.
    plan = units(
        plan_balloon(snapshot(100, engine("a", demand=11, limit=12), engine("b", demand=21, limit=22)), PARAMS)
    )
    assert plan == {"a": 12, "b": 22}
    plan = units(plan_balloon(snapshot(100, engine("a", demand=9, limit=12), engine("b", demand=19, limit=20)), PARAMS))
    assert plan == {"a": 12, "b": 20}


def test_hysteresis_never_breaks_the_budget():
    # Keeping a's slightly larger limit would put the sum over the budget.
    plan = units(
        plan_balloon(snapshot(40, engine("a", demand=100, limit=21), engine("b", demand=100, limit=19)), PARAMS)
    )
    assert sum(plan.values()) <= 40


def test_no_flapping_under_noisy_demand():
    rng = random.Random(7)
    limits = {"a": 0, "b": 0}
    changes = 0
    for _ in range(200):
        engines = [engine(m, demand=base + rng.randint(-1, 1), limit=limits[m]) for m, base in (("a", 30), ("b", 50))]
        plan = units(plan_balloon(snapshot(200, *engines), PARAMS))
        changes += sum(plan[m] != limits[m] for m in plan)
        limits = plan
    assert changes <= 4  # the first plan sets both; noise of one unit moves nothing after


@pytest.mark.parametrize("seed", range(30))
def test_limits_never_sum_over_the_budget(seed):
    rng = random.Random(seed)
    budget = rng.randint(1, 300)
    engines = [
        engine(
            f"m{i}",
            demand=rng.randint(0, 200),
            used=rng.randint(0, 100),
            limit=rng.randint(0, 150),
            priority=rng.randint(1, 4),
            cap=rng.choice([0, 0, rng.randint(1, 100)]),
        )
        for i in range(rng.randint(1, 5))
    ]
    for policy in (plan_balloon, plan_static):
        plan = policy(snapshot(budget, *engines), PARAMS)
        assert sum(plan.values()) <= budget * UNIT
        assert all(v % UNIT == 0 and v >= 0 for v in plan.values())
        for e in engines:
            assert e.cap_bytes == 0 or plan[e.model] <= max(e.cap_bytes, UNIT)


def test_water_fill_is_max_min_fair():
    assert water_fill({"a": 10, "b": 10}, {"a": 1, "b": 1}, 10) == {"a": 5, "b": 5}
    assert water_fill({"a": 2, "b": 100}, {"a": 1, "b": 1}, 50) == {"a": 2, "b": 48}
    assert water_fill({"a": 100, "b": 100}, {"a": 3, "b": 1}, 40) == {"a": 30, "b": 10}
    assert sum(water_fill({"a": 100, "b": 100, "c": 100}, {"a": 1, "b": 1, "c": 1}, 10).values()) == 10


def test_static_splits_equally_whatever_the_demand():
    plan = units(plan_static(snapshot(100, engine("a", demand=90), engine("b", demand=0)), PARAMS))
    assert plan == {"a": 50, "b": 50}


def test_grant_comes_from_unassigned_budget_only():
    snap = snapshot(100, engine("a", limit=30), engine("b", limit=60))
    assert grant(snap, "a", 5 * UNIT) == 35 * UNIT
    assert grant(snap, "a", 10 * UNIT) == 40 * UNIT
    assert grant(snap, "a", 11 * UNIT) is None
    assert grant(snap, "a", UNIT // 2) == 31 * UNIT  # whole units
    assert grant(snapshot(100, engine("a", limit=30, cap=32)), "a", 5 * UNIT) is None
    assert grant(snap, "nope", UNIT) is None


def test_recent_demand_is_the_peak_over_the_window():
    recent = RecentDemand(window_s=1.0)
    assert recent.observe("a", 0.0, 10) == 10
    assert recent.observe("a", 0.3, 40) == 40
    assert recent.observe("a", 0.6, 5) == 40
    assert recent.observe("a", 1.2, 20) == 40  # 40 was seen 0.9 s ago
    assert recent.observe("a", 1.35, 7) == 20  # now 1.05 s ago: gone; 20 is the largest left
    assert recent.observe("b", 1.35, 3) == 3  # each engine its own
    recent.forget_all_but({"b"})
    assert recent.observe("a", 1.4, 1) == 1


def test_recent_demand_matches_a_brute_force_window():
    rng = random.Random(3)
    recent, samples, now = RecentDemand(window_s=0.5), [], 0.0
    for _ in range(500):
        now += rng.uniform(0, 0.2)
        value = rng.randint(0, 100)
        samples.append((now, value))
        assert recent.observe("a", now, value) == max(v for t, v in samples if t >= now - 0.5)


def test_a_recent_peak_is_held_while_nobody_needs_the_memory():
    # a's requests just ended (demand 5) but it needed 30 a moment ago: with the
    # budget free it keeps room for its peak (plus headroom) instead of shrinking.
    plan = units(
        plan_balloon(
            snapshot(100, engine("a", demand=5, limit=32, recent=30), engine("b", demand=10, limit=12)), PARAMS
        )
    )
    assert plan == {"a": 32, "b": 12}


def test_a_recent_peak_yields_to_another_engines_demand():
    # b's burst needs 80 of the 100: a's held peak gives way down to its demand.
    plan = units(
        plan_balloon(
            snapshot(100, engine("a", demand=5, limit=32, recent=30), engine("b", demand=80, limit=12)), PARAMS
        )
    )
    assert plan["b"] >= 80
    assert 5 <= plan["a"] <= 20
    assert sum(plan.values()) <= 100


def test_a_tiny_budget_does_not_flap_between_a_bursts_requests():
    # Four units of budget (no hysteresis left at that size): a bursting engine
    # whose demand dips between requests keeps its limit while its recent peak lasts.
    params = PolicyParams(headroom_units=0, hysteresis_units=2, demand_hold_s=1.0)
    recent = RecentDemand(params.demand_hold_s)
    limits = {"a": 1, "b": 1}
    changes = 0
    for step in range(40):  # 4 s at the coordinator's 100 ms
        now = step * 0.1
        demand_a = 3 if step % 5 else 1  # a request ends every half second and the next arrives
        engines = [
            engine("a", demand=demand_a, limit=limits["a"], recent=recent.observe("a", now, demand_a)),
            engine("b", demand=1, limit=limits["b"], recent=recent.observe("b", now, 1)),
        ]
        plan = units(
            plan_balloon(
                DeviceMemorySnapshot(budget_bytes=4 * UNIT, unit_bytes=UNIT, engines=tuple(e for e in engines)), params
            )
        )
        changes += sum(plan[m] != limits[m] for m in plan)
        limits = plan
    assert limits == {"a": 3, "b": 1}
    assert changes == 1  # a grew once, and stayed


def test_a_prefix_cache_keeps_its_memory_only_where_no_demand_needs_it():
    # Free budget: the idle engine keeps its cache (after the busy one's demand and both headrooms).
    plan = units(plan_balloon(snapshot(100, engine("a", demand=10), engine("b", cached=50)), PARAMS))
    assert plan == {"a": 12, "b": 52}
    # Demand that needs it takes it: b's cache is cut to what is left (its headroom first).
    plan = units(plan_balloon(snapshot(100, engine("a", demand=90), engine("b", cached=50, limit=52)), PARAMS))
    assert plan["a"] >= 90 and plan["b"] <= 10 and sum(plan.values()) == 100
    # A cache never counts as demand: under contention it gets nothing beyond the floor.
    plan = units(plan_balloon(snapshot(100, engine("a", demand=120), engine("b", cached=50, limit=52)), PARAMS))
    assert plan["b"] == 1


def test_a_grant_the_free_budget_cannot_cover_takes_other_engines_cache_only_memory():
    snap = snapshot(
        110, engine("a", limit=30), engine("b", limit=60, used=10, cached=40), engine("c", limit=10, cached=8)
    )
    assert cache_to_free(snap, "a", 10 * UNIT) == {}  # the unassigned 10 units cover it
    assert cache_to_free(snap, "a", 25 * UNIT) == {"b": 45 * UNIT}  # the largest cache first
    # b's requests hold 10 units: at most its 40 of cache can go; then c's.
    assert cache_to_free(snap, "a", 55 * UNIT) == {"b": 20 * UNIT, "c": 5 * UNIT}
    assert cache_to_free(snap, "a", 70 * UNIT) is None  # more than the caches hold
    assert cache_to_free(snap, "nope", UNIT) is None
