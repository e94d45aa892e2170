"""The placement policies (dedicated, time-share, prism) and the action
planner on hand-built cluster snapshots: pure functions, no processes."""

from __future__ import annotations

import random

import pytest

from services.common import placement_config as pc
from services.common.records import EngineRecord
from services.scheduler.actions import (
    DEACTIVATE_BUSY_WINDOW_S,
    REACTIVATE_HOLD_S,
    Action,
    plan_actions,
    still_held_off,
)
from services.scheduler.policies import (
    AgentView,
    ClusterSnapshot,
    ModelDemand,
    Placement,
    PolicyParams,
    ReplicaTarget,
    compute_load,
    dedicated_policy,
    prism_policy,
    time_share_policy,
)

GB = 1 << 30


def models(*names: str, tp: dict[str, int] | None = None, priority: dict[str, int] | None = None):
    tp, priority = tp or {}, priority or {}
    return pc.parse(
        [
            {
                "model_name": n,
                "model_path": f"/m/{n}",
                "tp_size": tp.get(n, 1),
                "priority": priority.get(n, 1),
                "init_placements": [{"gpu_ids": list(range(tp.get(n, 1)))}],
            }
            for n in names
        ]
    ).models


def agent(agent_id: str, gpus: int, memory: int = 80 * GB) -> AgentView:
    return AgentView(agent_id, frozenset(range(gpus)), dict.fromkeys(range(gpus), memory))


def hot(rate: float = 1.0, kv: int = 0) -> ModelDemand:
    # Arrivals in the last seconds too (the reports' recent rate): a model with demand now, not one whose
    # burst has ended (is_idle_now).
    return ModelDemand(arrival_rate=rate, recent_arrival_rate=rate, kv_demand_bytes=kv)


def active_of(placement: Placement) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    return {m: [(r.agent_id, r.gpu_ids) for r in rs if r.active] for m, rs in placement.items()}


def as_current(placement: Placement) -> Placement:
    """What the agents run once they have carried a target out."""
    return {m: list(rs) for m, rs in placement.items()}


# ---- dedicated -------------------------------------------------------------------


def test_dedicated_gives_each_model_its_own_gpus_and_leaves_the_rest_unplaced():
    snap = ClusterSnapshot(
        models=models("a", "b", "c", "big", tp={"big": 2}, priority={"big": 2}), agents=(agent("x", 4),)
    )
    target = dedicated_policy(snap)
    assert target["big"] == [ReplicaTarget("x", (0, 1), True)]  # highest priority first
    assert target["a"] == [ReplicaTarget("x", (2,), True)]
    assert target["b"] == [ReplicaTarget("x", (3,), True)]
    assert target["c"] == []  # no GPU left: a dedicated cluster needs one more
    # What runs keeps its GPUs.
    again = dedicated_policy(ClusterSnapshot(models=snap.models, agents=snap.agents, current=as_current(target)))
    assert again == target


def test_dedicated_gives_a_model_provisioned_with_several_placements_that_many_agents():
    hot_model, cold = pc.parse(
        [
            {
                "model_name": "hot",
                "model_path": "/m/hot",
                "priority": 2,
                "init_placements": [{"gpu_ids": [0]}, {"gpu_ids": [0]}, {"gpu_ids": [0]}],
            },
            {"model_name": "cold", "model_path": "/m/cold", "init_placements": [{"gpu_ids": [0]}]},
        ]
    ).models
    agents = (agent("x", 2), agent("y", 1), agent("z", 1))
    target = dedicated_policy(ClusterSnapshot(models=(hot_model, cold), agents=agents))
    assert sorted(r.agent_id for r in target["hot"]) == ["x", "y", "z"]  # one replica an agent
    assert all(r.active for r in target["hot"])
    assert target["cold"] == [ReplicaTarget("x", (1,), True)]  # the GPU the hot model could not take
    again = dedicated_policy(ClusterSnapshot(models=(hot_model, cold), agents=agents, current=as_current(target)))
    assert again == target
    # Fewer agents than placements: as many replicas as there are agents, never two on one.
    fewer = dedicated_policy(ClusterSnapshot(models=(hot_model,), agents=(agent("x", 4),)))
    assert fewer["hot"] == [ReplicaTarget("x", (0,), True)]


# ---- time-share ------------------------------------------------------------------


def test_time_share_places_everyone_and_keeps_one_active_per_gpu():
    snap = ClusterSnapshot(
        models=models("a", "b", "c", "d"), agents=(agent("x", 2),), demand={"a": hot(1.0), "c": hot(5.0)}
    )
    target = time_share_policy(snap)
    homes = {m: rs[0].gpu_ids for m, rs in target.items()}
    assert sorted(homes.values()) == [(0,), (0,), (1,), (1,)]  # spread two and two
    per_gpu_active: dict[tuple[int, ...], int] = {}
    for rs in target.values():
        for r in rs:
            per_gpu_active[r.gpu_ids] = per_gpu_active.get(r.gpu_ids, 0) + r.active
    assert all(n <= 1 for n in per_gpu_active.values())
    # Placement ignores demand (round robin: a and c share GPU 0), so of the two hot models only
    # the busier runs; the other waits for its turn: the baseline's weakness.
    assert homes["a"] == homes["c"] == (0,)
    assert target["c"][0].active and not target["a"][0].active


def test_time_share_keeps_the_active_model_while_it_has_demand_then_swaps():
    snap = ClusterSnapshot(
        models=models("a", "b"),
        agents=(agent("x", 1),),
        current={"a": [ReplicaTarget("x", (0,), True)], "b": [ReplicaTarget("x", (0,), False)]},
        demand={"a": hot(0.1), "b": hot(9.0)},
    )
    target = time_share_policy(snap)
    assert target["a"][0].active and not target["b"][0].active  # no flapping to the busier one
    snap = ClusterSnapshot(models=snap.models, agents=snap.agents, current=snap.current, demand={"b": hot(9.0)})
    target = time_share_policy(snap)
    assert target["b"][0].active and not target["a"][0].active  # a went cold: b's turn


# ---- prism -----------------------------------------------------------------------


def test_prism_places_cold_models_inactive_and_spread():
    snap = ClusterSnapshot(models=models(*"abcdef"), agents=(agent("x", 2), agent("y", 1)))
    target = prism_policy(snap)
    assert all(len(rs) == 1 and not rs[0].active for rs in target.values())
    per_set: dict[tuple[str, tuple[int, ...]], int] = {}
    for rs in target.values():
        per_set[(rs[0].agent_id, rs[0].gpu_ids)] = per_set.get((rs[0].agent_id, rs[0].gpu_ids), 0) + 1
    assert sorted(per_set.values()) == [2, 2, 2]


def test_prism_colocates_hot_models_that_fit_and_switches_off_cold_ones():
    weights = {"a": 16 * GB, "b": 6 * GB, "c": 2 * GB}
    current = {m: [ReplicaTarget("x", (0,), True)] for m in "abc"}
    snap = ClusterSnapshot(
        models=models("a", "b", "c"),
        agents=(agent("x", 2),),
        weight_bytes=weights,
        current=current,
        demand={"a": hot(3, kv=10 * GB), "b": hot(1, kv=5 * GB)},
    )
    target = prism_policy(snap)
    assert active_of(target) == {"a": [("x", (0,))], "b": [("x", (0,))], "c": []}  # a and b share GPU 0
    assert target["c"] == [ReplicaTarget("x", (0,), False)]  # cold: off the GPU, placed where it was


def test_prism_spreads_a_group_that_bursts_together_make_before_break():
    # An agent runs one engine per model, so a model's second replica goes to another agent.
    weights = dict.fromkeys("abc", 16 * GB)
    current = {m: [ReplicaTarget("x", (0,), False)] for m in "abc"}
    demand = {m: hot(1, kv=20 * GB) for m in "abc"}  # 3 x 36 GB: more than x's 80 GB (compute fits)
    snap = ClusterSnapshot(
        models=models("a", "b", "c"),
        agents=(agent("x", 1), agent("y", 1)),
        weight_bytes=weights,
        current=current,
        demand=demand,
    )
    target = prism_policy(snap)
    moved = [m for m, rs in target.items() if len(rs) == 2]
    assert len(moved) == 1  # two fit on x; the third gets a replica on y ...
    (m,) = moved
    assert {r.agent_id for r in target[m]} == {"x", "y"} and all(r.active for r in target[m])
    # ... and once that replica is active, the one on the crowded GPU goes.
    current = as_current(target)
    current[m] = [ReplicaTarget("x", (0,), True), ReplicaTarget("y", (0,), True)]
    after = prism_policy(
        ClusterSnapshot(models=snap.models, agents=snap.agents, weight_bytes=weights, current=current, demand=demand)
    )
    assert after[m] == [ReplicaTarget("y", (0,), True)]
    assert sum(1 for rs in after.values() for r in rs if r.agent_id == "x" and r.active) == 2


def test_prism_never_plans_two_engines_of_a_model_on_one_agent():
    # GPU 0 of x is too full for the third model, GPU 1 is free, but x already runs that model's
    # engine: moving it there would need a second engine of it on x, which agents do not run.
    weights = dict.fromkeys("abc", 16 * GB)
    current = {m: [ReplicaTarget("x", (0,), True)] for m in "abc"}
    demand = {m: hot(1, kv=20 * GB) for m in "abc"}
    target = prism_policy(
        ClusterSnapshot(
            models=models("a", "b", "c"), agents=(agent("x", 2),), weight_bytes=weights, current=current, demand=demand
        )
    )
    for replicas in target.values():
        assert len({r.agent_id for r in replicas}) == len(replicas)


def test_prism_keeps_the_placement_under_noisy_demand():
    rng = random.Random(3)
    weights = dict.fromkeys("abcd", 6 * GB)
    snap_models, agents = models(*"abcd"), (agent("x", 2),)
    current: Placement = {}
    changes = 0
    previous = None
    for _ in range(100):
        demand = {m: hot(rng.uniform(0.5, 2.0), kv=int(rng.uniform(2, 8) * GB)) for m in "abc"}  # d stays cold
        target = prism_policy(
            ClusterSnapshot(models=snap_models, agents=agents, weight_bytes=weights, current=current, demand=demand)
        )
        changes += target != previous
        previous, current = target, as_current(target)
    assert changes == 1  # the first plan; noise moves nothing after


def test_prism_places_tensor_parallel_models_on_gpus_of_one_agent_and_replaces_a_dead_agents_models():
    snap = ClusterSnapshot(
        models=models("big", "small", tp={"big": 2}),
        agents=(agent("x", 1), agent("y", 2)),
        current={"small": [ReplicaTarget("gone", (0,), True)]},
        demand={"big": hot()},
    )
    target = prism_policy(snap)
    assert target["big"] == [ReplicaTarget("y", (0, 1), True)]
    assert len(target["small"]) == 1 and target["small"][0].agent_id in ("x", "y")  # off the dead agent


def test_prism_counts_a_split_models_gpus_one_by_one_not_summed():
    # One agent of 4 GPUs, a small hot model running on each at a fifth of a GPU's compute, and a
    # model split over all 4 (tp_size 4), not loaded yet, that needs a quarter of each. Each GPU then
    # stays within the compute capacity: the split model fits beside them. (Summing the four GPUs'
    # loads for its GPU set made it fit nowhere, and a model that fits nowhere beside protected ones
    # is shed: unloaded, and a 70B config then loads again a minute later; seen on 4 H200s.)
    small = [f"s{i}" for i in range(4)]
    snap_models = models(*small, "big", tp={"big": 4})
    weights = {**dict.fromkeys(small, 2 * GB), "big": 140 * GB}
    params = PolicyParams()
    current = {m: [ReplicaTarget("x", (i,), True)] for i, m in enumerate(small)}

    def snapshot(small_rate: float) -> ClusterSnapshot:
        demand = {**{m: busy(small_rate) for m in small}, "big": busy(1.0)}
        return ClusterSnapshot(
            models=snap_models,
            agents=(agent("x", 4, memory=141 * GB),),
            weight_bytes=weights,
            current=current,
            demand=demand,
        )

    small_rate = next(
        r for r in (x / 8 for x in range(1, 400)) if compute_load(snapshot(r), snap_models[0], params) >= 0.2
    )
    snap = snapshot(small_rate)
    loads = {m.model_name: compute_load(snap, m, params) for m in snap.models}
    assert loads["s0"] + loads["big"] <= params.compute_capacity
    assert 4 * loads["s0"] + loads["big"] > params.compute_overload  # the four GPUs' sum
    target = prism_policy(snap, params)
    assert active_of(target) == {**{m: [("x", (i,))] for i, m in enumerate(small)}, "big": [("x", (0, 1, 2, 3))]}


def test_prism_counts_a_split_models_memory_on_its_fullest_gpu():
    # The same for memory: small models of 30 GB on each of 4 GPUs of 80 GB leave 50 GB on each,
    # room for a model split over all 4 that needs 40 GB on each; the sum over the GPUs (120 GB) is not.
    small = [f"s{i}" for i in range(4)]
    snap_models = models(*small, "big", tp={"big": 4})
    weights = {**dict.fromkeys(small, 30 * GB), "big": 160 * GB}
    current = {m: [ReplicaTarget("x", (i,), True)] for i, m in enumerate(small)}
    snap = ClusterSnapshot(
        models=snap_models,
        agents=(agent("x", 4, memory=80 * GB),),
        weight_bytes=weights,
        current=current,
        demand={m: hot(0.1) for m in [*small, "big"]},
    )
    target = prism_policy(snap)
    assert active_of(target)["big"] == [("x", (0, 1, 2, 3))]
    assert all(active_of(target)[m] == [("x", (i,))] for i, m in enumerate(small))


# ---- actions ---------------------------------------------------------------------


def test_actions_switch_engines_on_and_off_only_for_policies_that_manage_activity():
    target = {
        "a": [ReplicaTarget("x", (0,), True)],
        "b": [ReplicaTarget("x", (0,), False)],
        "c": [ReplicaTarget("x", (1,), True)],
    }
    engines = {
        ("x", "a"): EngineRecord("x", "a", "inactive", [0]),
        ("x", "b"): EngineRecord("x", "b", "active", [0]),
        ("x", "old"): EngineRecord("x", "old", "inactive", [1]),
    }
    assert plan_actions(target, engines, {"x"}, manage_activity=True) == [
        Action("unload", "x", "old"),
        Action("deactivate", "x", "b", (0,), False, busy_window_s=DEACTIVATE_BUSY_WINDOW_S),
        Action("load", "x", "c", (1,), True, 0),
        Action("activate", "x", "a", (0,)),
    ]
    assert plan_actions(target, engines, {"x"}) == [
        Action("unload", "x", "old"),
        Action("load", "x", "c", (1,), True, 0),
    ]
    # The agent's busy window can be left to hold switched-off engines on, as before (the simulator's ablation).
    held = plan_actions(target, engines, {"x"}, manage_activity=True, deactivate_busy_window_s=0.0)
    assert Action("deactivate", "x", "b", (0,), False) in held
    # An engine the scheduler switched on moments ago and finds off (its agent switched it off) stays off.
    after_agent_relief = plan_actions(target, engines, {"x"}, manage_activity=True, held_off=frozenset({("x", "a")}))
    assert [a.kind for a in after_agent_relief] == ["unload", "deactivate", "load"]
    # Held off for REACTIVATE_HOLD_S after the scheduler switched it on, no longer.
    switched_on = {("x", "a"): 100.0, ("x", "b"): 100.0 - REACTIVATE_HOLD_S}
    assert still_held_off(switched_on, now=100.0 + REACTIVATE_HOLD_S / 2) == {("x", "a"): 100.0}


def test_prism_moves_the_same_model_whatever_the_noise_in_the_rates():
    # Two models running side by side on a GPU too small for both: one gets a replica elsewhere;
    # which one must not depend on whose rate is a little higher at each plan.
    weights = dict.fromkeys("ab", 16 * GB)
    snap_models, agents = models("a", "b"), (agent("x", 1), agent("y", 1))
    current = {m: [ReplicaTarget("x", (0,), True)] for m in "ab"}
    moved = set()
    for i in range(20):
        rates = (1.0, 1.1) if i % 2 else (1.1, 1.0)
        demand = {"a": hot(rates[0], kv=30 * GB), "b": hot(rates[1], kv=30 * GB)}
        target = prism_policy(
            ClusterSnapshot(models=snap_models, agents=agents, weight_bytes=weights, current=current, demand=demand)
        )
        moved |= {m for m, rs in target.items() if any(r.agent_id == "y" for r in rs)}
    assert moved == {"b"}


def test_new_models_are_spread_by_count_then_by_weight():
    # The largest first, each to the GPU with the fewest models, ties to the lightest (home_of_everyone):
    # the big one alone, two small ones beside each other, the third beside the big one. Spread by
    # weight first, all three small ones would share the second GPU.
    weights = {"big": 16 * GB, "s0": 2 * GB, "s1": 2 * GB, "s2": 2 * GB}
    snap = ClusterSnapshot(models=models(*weights), agents=(agent("x", 2),), weight_bytes=weights)
    for policy in (prism_policy, time_share_policy):
        target = policy(snap)
        per_gpu: dict[tuple[int, ...], list[str]] = {}
        for name, rs in target.items():
            per_gpu.setdefault(rs[0].gpu_ids, []).append(name)
        assert sorted(sorted(names) for names in per_gpu.values()) == [["big", "s2"], ["s0", "s1"]], policy


# ---- prism: compute ----------------------------------------------------------------


def busy(rate: float, busy_fraction: float = 1.0) -> ModelDemand:
    return ModelDemand(
        arrival_rate=rate,
        recent_arrival_rate=rate,
        busy_fraction=busy_fraction,
        mean_prompt_tokens=512,
        mean_output_tokens=128,
    )


def test_compute_load_grows_with_rate_and_size_and_a_busy_fraction_caps_the_fixed_cost():
    weights = {"small": 2 * GB, "big": 16 * GB}
    snap = ClusterSnapshot(
        models=models("small", "big"),
        agents=(agent("x", 1),),
        weight_bytes=weights,
        demand={"small": busy(4.0), "big": busy(4.0)},
    )
    small, big = (compute_load(snap, m, PolicyParams()) for m in snap.models)
    assert 0 < small < big
    faster = ClusterSnapshot(
        models=snap.models, agents=snap.agents, weight_bytes=weights, demand={"small": busy(8.0), "big": busy(8.0)}
    )
    assert compute_load(faster, faster.models[0], PolicyParams()) > small
    # The same rate, busy a tenth of the time (bursts): less fixed per-step cost.
    bursty = ClusterSnapshot(
        models=snap.models,
        agents=snap.agents,
        weight_bytes=weights,
        demand={"small": busy(4.0, 0.1), "big": busy(4.0, 0.1)},
    )
    assert compute_load(bursty, bursty.models[0], PolicyParams()) < small


def test_prism_spreads_hot_models_whose_compute_does_not_fit_one_gpu():
    # Two 8B models at 8 requests/s each fit x's memory (2 x 16 GB weights, little KV) but not its compute.
    weights = dict.fromkeys("ab", 16 * GB)
    current = {m: [ReplicaTarget("x", (0,), True)] for m in "ab"}
    snap = ClusterSnapshot(
        models=models("a", "b"),
        agents=(agent("x", 1), agent("y", 1)),
        weight_bytes=weights,
        current=current,
        demand={m: busy(8.0) for m in "ab"},
    )
    params = PolicyParams()
    loads = [compute_load(snap, m, params) for m in snap.models]
    assert max(loads) <= params.compute_capacity < sum(loads)
    target = prism_policy(snap, params)
    moved = [m for m, rs in target.items() if any(r.agent_id == "y" and r.active for r in rs)]
    assert len(moved) == 1  # one stays on x, the other gets a replica on y (made before x's breaks)
    after = prism_policy(
        ClusterSnapshot(
            models=snap.models,
            agents=snap.agents,
            weight_bytes=weights,
            current={**current, moved[0]: [ReplicaTarget("x", (0,), True), ReplicaTarget("y", (0,), True)]},
            demand=snap.demand,
        ),
        params,
    )
    assert active_of(after) == {moved[0]: [("y", (0,))], ({"a", "b"} - set(moved)).pop(): [("x", (0,))]}
    # With memory alone (the compute check off), both would have stayed on x.
    lax = prism_policy(snap, PolicyParams(compute_capacity=10.0))
    assert active_of(lax) == {"a": [("x", (0,))], "b": [("x", (0,))]}


def test_prism_keeps_cold_and_light_models_sharing_one_gpu():
    # Many light models: their compute fits one GPU together, so nothing moves.
    names = [f"m{i}" for i in range(6)]
    weights = dict.fromkeys(names, 2 * GB)
    current = {m: [ReplicaTarget("x", (0,), True)] for m in names}
    demand = {m: busy(1.0, 0.3) for m in names[:4]}  # two stay cold
    snap = ClusterSnapshot(
        models=models(*names),
        agents=(agent("x", 1), agent("y", 1)),
        weight_bytes=weights,
        current=current,
        demand=demand,
    )
    assert sum(compute_load(snap, m, PolicyParams()) for m in snap.models) < PolicyParams().compute_capacity
    target = prism_policy(snap)
    assert all(rs == [ReplicaTarget("x", (0,), True)] for m, rs in target.items() if m in demand)
    assert all(rs == [ReplicaTarget("x", (0,), False)] for m, rs in target.items() if m not in demand)


def test_prism_standby_replicas_wait_switched_off_on_other_agents_and_stay_put():
    """With standby_replicas, each model on one GPU set gets that many switched-off replicas on other
    agents, spread by the weight already placed on them; the next plan keeps them where they are."""
    names = ["a", "b", "c"]
    weights = {"a": 16 * GB, "b": 2 * GB, "c": 2 * GB}
    agents = tuple(agent(a, 1) for a in ("x", "y", "z"))
    current = {
        "a": [ReplicaTarget("x", (0,), True)],
        "b": [ReplicaTarget("y", (0,), True)],
        "c": [ReplicaTarget("y", (0,), False)],
    }
    snap = ClusterSnapshot(
        models=models(*names),
        agents=agents,
        weight_bytes=weights,
        current=current,
        demand={"a": busy(2.0), "b": busy(1.0)},
    )
    params = PolicyParams(standby_replicas=1)
    target = prism_policy(snap, params)
    plain = prism_policy(snap)
    for name in names:
        first, *standby = target[name]
        assert first == plain[name][0] and len(plain[name]) == 1  # as without standbys, plus one
        assert [r.active for r in standby] == [False] and standby[0].agent_id != first.agent_id
    assert target["a"][1].agent_id == "z"  # the agent with nothing on it, not y (b and c are there)
    assert target["b"][1].agent_id == "x"  # x and z hold 16 GB each now: the first by name
    assert target["c"][1].agent_id == "z"  # x holds 18 GB by then
    again = prism_policy(
        ClusterSnapshot(
            models=snap.models, agents=agents, weight_bytes=weights, current=as_current(target), demand=snap.demand
        ),
        params,
    )
    assert again == target
    two = prism_policy(snap, PolicyParams(standby_replicas=2))
    assert all(
        len({r.agent_id for r in two[n]}) == 3 and sum(r.active for r in two[n]) == plain_active
        for n, plain_active in (("a", 1), ("b", 1), ("c", 0))
    )


def test_prism_spreads_a_model_no_gpu_has_room_for_while_the_gpus_have_the_compute_in_sum():
    # Three agents of one GPU; four hot 8B models each needing most of a GPU's compute (capacity).
    # The busiest three keep a GPU each; d, beside a on x, fits whole nowhere, but the four need
    # less than the GPUs' overload bound in sum: d gets two replicas, half its load each, on x and
    # z (the GPU with the most room), rather than all of it squeezed onto one.
    names = ["a", "b", "c", "d"]
    weights = dict.fromkeys(names, 16 * GB)
    agents = tuple(agent(a, 1) for a in ("x", "y", "z"))
    current = {
        "a": [ReplicaTarget("x", (0,), True)],
        "b": [ReplicaTarget("y", (0,), True)],
        "c": [ReplicaTarget("z", (0,), True)],
        "d": [ReplicaTarget("x", (0,), True)],
    }
    demand = {"a": busy(9.0), "b": busy(10.0), "c": busy(6.0), "d": busy(8.0)}
    snap = ClusterSnapshot(models=models(*names), agents=agents, weight_bytes=weights, current=current, demand=demand)
    params = PolicyParams()
    loads = {m.model_name: compute_load(snap, m, params) for m in snap.models}
    assert all(load > params.compute_capacity / 2 for load in loads.values())
    assert sum(loads.values()) < params.compute_overload * len(agents)
    target = prism_policy(snap, params)
    assert sorted(r.agent_id for r in target["d"] if r.active) == ["x", "z"]
    assert active_of(target)["a"] == [("x", (0,))] and active_of(target)["b"] == [("y", (0,))]
    assert (
        loads["a"] + loads["d"] / 2 < params.compute_overload and loads["c"] + loads["d"] / 2 < params.compute_overload
    )
    again = prism_policy(
        ClusterSnapshot(
            models=snap.models, agents=agents, weight_bytes=weights, demand=demand, current=as_current(target)
        ),
        params,
    )
    assert {n: sorted(v) for n, v in active_of(again).items()} == {n: sorted(v) for n, v in active_of(target).items()}


def test_prism_puts_what_fits_nowhere_together_so_the_others_keep_their_slo():
    # As above, with e and f as well: now the GPUs are short of compute in sum (triage). The busiest
    # three keep a GPU each; d, which fits nowhere, goes to the GPU whose model has the fewest
    # requests, rather than spreading the overload over every GPU; e and f, for which no GPU has
    # room under the overload bound, are shed.
    names = ["a", "b", "c", "d", "e", "f"]
    weights = dict.fromkeys(names, 16 * GB)
    agents = tuple(agent(a, 1) for a in ("x", "y", "z"))
    current = {
        "a": [ReplicaTarget("x", (0,), True)],
        "b": [ReplicaTarget("y", (0,), True)],
        "c": [ReplicaTarget("z", (0,), True)],
        "d": [ReplicaTarget("x", (0,), True)],
        "e": [ReplicaTarget("y", (0,), True)],
        "f": [ReplicaTarget("z", (0,), True)],
    }
    demand = {"a": busy(9.0), "b": busy(10.0), "c": busy(6.0), "d": busy(8.0), "e": busy(9.5), "f": busy(7.0)}
    snap = ClusterSnapshot(models=models(*names), agents=agents, weight_bytes=weights, current=current, demand=demand)
    params = PolicyParams()
    loads = [compute_load(snap, m, params) for m in snap.models]
    assert all(load > params.compute_capacity / 2 for load in loads)
    assert sum(loads) > params.compute_overload * len(agents)
    target = prism_policy(snap, params)
    # d (on x beside a) overflows; z, whose c has the fewest requests, takes it (x keeps it until then).
    assert [r.agent_id for r in target["d"] if r.active] == ["z", "x"]
    assert active_of(target)["a"] == [("x", (0,))] and active_of(target)["b"] == [("y", (0,))]
    assert not any(r.active for r in target["e"] + target["f"])
    settled = prism_policy(
        ClusterSnapshot(
            models=snap.models,
            agents=agents,
            weight_bytes=weights,
            demand=demand,
            current={**current, "d": [ReplicaTarget("x", (0,), True), ReplicaTarget("z", (0,), True)]},
        ),
        params,
    )
    assert active_of(settled)["d"] == [("z", (0,))]


def test_prism_sheds_a_model_whose_squeeze_would_overload_a_gpu_and_serves_it_again_once_there_is_room():
    # One GPU; a (10 req/s) fits its compute, b (8 req/s) fits nowhere. Beside a, the two would need
    # more than the overload bound: b is shed, not switched on by the plan, so that a keeps its SLO,
    # rather than both missing theirs. It stays loaded, switched off (shed_stays_loaded: its requests
    # switch it on where idle engines step aside); unplaced without it.
    names = ["a", "b"]
    weights = dict.fromkeys(names, 16 * GB)
    current = {m: [ReplicaTarget("x", (0,), True)] for m in names}
    demand = {"a": busy(10.0), "b": busy(8.0)}
    snap = ClusterSnapshot(
        models=models(*names), agents=(agent("x", 1),), weight_bytes=weights, current=current, demand=demand
    )
    params = PolicyParams()
    a_load, b_load = (compute_load(snap, m, params) for m in snap.models)
    assert a_load <= params.compute_capacity and a_load + b_load > params.compute_overload
    target = prism_policy(snap, params)
    assert target["a"] == [ReplicaTarget("x", (0,), True)] and target["b"] == [ReplicaTarget("x", (0,), False)]
    unplaced = prism_policy(snap, PolicyParams(shed_stays_loaded=False))
    assert unplaced["a"] == [ReplicaTarget("x", (0,), True)] and unplaced["b"] == []
    # Under the bound (b at 4 req/s), b squeezes in beside a instead.
    light = {**demand, "b": busy(4.0)}
    target = prism_policy(
        ClusterSnapshot(models=snap.models, agents=snap.agents, weight_bytes=weights, current=current, demand=light),
        params,
    )
    assert active_of(target) == {"a": [("x", (0,))], "b": [("x", (0,))]}
    # b busier than a (12 req/s against 10): shedding it would cost more requests their SLO than the
    # squeeze puts at risk, so it goes beside a (the GPU sacrificed), active.
    busier = {**demand, "b": busy(12.0)}
    busier_snap = ClusterSnapshot(
        models=snap.models, agents=snap.agents, weight_bytes=weights, current=current, demand=busier
    )
    assert sum(compute_load(busier_snap, m, params) for m in snap.models) > params.compute_overload
    assert active_of(prism_policy(busier_snap, params)) == {"a": [("x", (0,))], "b": [("x", (0,))]}
    # A second GPU: b goes there.
    target = prism_policy(
        ClusterSnapshot(
            models=snap.models,
            agents=(agent("x", 1), agent("y", 1)),
            weight_bytes=weights,
            current=current,
            demand=demand,
        ),
        params,
    )
    assert [r.agent_id for r in target["b"] if r.active][0] == "y"


def test_prism_keeps_a_serving_model_it_cannot_move_where_it_runs_while_the_gpus_have_room_in_sum():
    # As the shedding test, but the agent has a second GPU, with a light model on it: b cannot move
    # there (an agent runs one engine per model, so it moves between agents only), and the two GPUs
    # are not short of compute in sum, so b stays on GPU 0 beside a rather than being shed (which
    # would fail its requests in flight and unload it, to load it again once it is cold).
    names = ["a", "b", "c"]
    weights = dict.fromkeys(names, 16 * GB)
    current = {
        "a": [ReplicaTarget("x", (0,), True)],
        "b": [ReplicaTarget("x", (0,), True)],
        "c": [ReplicaTarget("x", (1,), True)],
    }
    demand = {"a": busy(10.0), "b": busy(8.0), "c": busy(0.5)}
    params = PolicyParams()
    snap = ClusterSnapshot(
        models=models(*names), agents=(agent("x", 2),), weight_bytes=weights, current=current, demand=demand
    )
    loads = {m.model_name: compute_load(snap, m, params) for m in snap.models}
    assert loads["a"] + loads["b"] > params.compute_overload  # beside a, b overloads GPU 0
    assert sum(loads.values()) <= 2 * params.compute_overload  # the two GPUs have room in sum
    target = prism_policy(snap, params)
    assert active_of(target) == {"a": [("x", (0,))], "b": [("x", (0,))], "c": [("x", (1,))]}
    # Not running yet (b only waiting at the gateways, say), it can go to GPU 1 instead.
    waiting = {**current, "b": []}
    target = prism_policy(
        ClusterSnapshot(models=snap.models, agents=snap.agents, weight_bytes=weights, current=waiting, demand=demand),
        params,
    )
    assert ("x", (1,)) in active_of(target)["b"]


def test_new_models_spread_over_the_gpus_by_count_before_weight():
    # A 70B-like model split over GPUs 0-1, then six small ones, all new: weights first put every small
    # model on GPUs 2 and 3 (each far lighter than a shard of the big one), where those that became
    # active together shared two GPUs' compute, and on one agent they could not move off again.
    names = ["big", *(f"s{i}" for i in range(6))]
    weights = {"big": 140 * GB, **{f"s{i}": GB for i in range(6)}}
    snap = ClusterSnapshot(
        models=models(*names, tp={"big": 2}), agents=(agent("x", 4, 141 * GB),), weight_bytes=weights
    )
    for policy in (prism_policy, time_share_policy):
        homes = {m: rs[0].gpu_ids for m, rs in policy(snap).items()}
        assert homes["big"] == (0, 1)
        small = [homes[f"s{i}"] for i in range(6)]
        assert sorted(small) == [(0,), (1,), (2,), (2,), (3,), (3,)], (policy.__name__, small)


def test_prism_gives_a_model_too_hot_for_one_gpu_replicas_on_several_and_drops_them_when_it_cools():
    # One 8B model at 30 req/s needs about 1.3 GPUs of compute: three replicas at capacity 0.5 each,
    # on three agents (one engine of a model per agent), the one it runs on among them.
    weights = {"a": 16 * GB, "b": 16 * GB}
    agents = tuple(agent(a, 1) for a in ("w", "x", "y", "z"))
    current = {"a": [ReplicaTarget("x", (0,), True)], "b": [ReplicaTarget("w", (0,), True)]}
    demand = {"a": busy(30.0), "b": busy(8.0)}
    snap = ClusterSnapshot(models=models("a", "b"), agents=agents, weight_bytes=weights, current=current, demand=demand)
    params = PolicyParams()
    load = compute_load(snap, snap.models[0], params)
    assert 2 * params.compute_capacity < load <= 3 * params.compute_capacity
    target = prism_policy(snap, params)
    replicas = active_of(target)["a"]
    assert len(replicas) == 3 and ("x", (0,)) in replicas
    assert len({agent_id for agent_id, _ in replicas}) == 3
    assert "w" not in {agent_id for agent_id, _ in replicas}  # b's GPU has the least compute room left
    assert active_of(target)["b"] == [("w", (0,))]
    # Carried out, the plan holds; at 16 req/s the three stay (two would be past capacity less the
    # margin), at 12 two are enough, at 6 one: a keeps some of its replicas and the others go.
    running = as_current(target)
    for rate, count in ((30.0, 3), (16.0, 3), (12.0, 2), (6.0, 1)):
        after = prism_policy(
            ClusterSnapshot(
                models=snap.models,
                agents=agents,
                weight_bytes=weights,
                current=running,
                demand={**demand, "a": busy(rate)},
            ),
            params,
        )
        kept = active_of(after)["a"]
        assert len(kept) == count, (rate, kept)
        assert set(kept) <= set(replicas)


def test_prism_shares_a_hot_models_load_among_the_replicas_it_finds():
    # Two agents only: the 30 req/s model gets both (it would want three), each taking half its load.
    weights = {"a": 16 * GB}
    agents = (agent("x", 1), agent("y", 1))
    snap = ClusterSnapshot(
        models=models("a"),
        agents=agents,
        weight_bytes=weights,
        current={"a": [ReplicaTarget("x", (0,), True)]},
        demand={"a": busy(30.0)},
    )
    target = prism_policy(snap)
    assert sorted(active_of(target)["a"]) == [("x", (0,)), ("y", (0,))]


def test_prism_replicates_a_burst_on_its_recent_rate_before_the_window_shows_it():
    # The window's 6 req/s fits one GPU; the last seconds' 30 req/s would need three. Replication
    # plans on the recent rate, so the replicas come as the burst starts.
    weights = {"a": 16 * GB}
    agents = tuple(agent(a, 1) for a in ("x", "y", "z"))
    current = {"a": [ReplicaTarget("x", (0,), True)]}

    def demand(recent: float) -> dict[str, ModelDemand]:
        return {
            "a": ModelDemand(
                arrival_rate=6.0,
                recent_arrival_rate=recent,
                busy_fraction=1.0,
                mean_prompt_tokens=512,
                mean_output_tokens=128,
            )
        }

    snap = ClusterSnapshot(
        models=models("a"), agents=agents, weight_bytes=weights, current=current, demand=demand(30.0)
    )
    assert compute_load(snap, snap.models[0], PolicyParams()) <= PolicyParams().compute_capacity
    assert sorted(active_of(prism_policy(snap))["a"]) == [("x", (0,)), ("y", (0,)), ("z", (0,))]
    calm = ClusterSnapshot(models=snap.models, agents=agents, weight_bytes=weights, current=current, demand=demand(6.0))
    assert active_of(prism_policy(calm))["a"] == [("x", (0,))]


def test_the_scheduler_takes_standby_replicas_from_its_command_line(capsys):
    from services.scheduler.server import parse_args

    assert parse_args(["--config", "models.json"]).standby_replicas == 0
    assert parse_args(["--config", "models.json", "--standby-replicas", "2"]).standby_replicas == 2
    with pytest.raises(SystemExit) as exited:
        parse_args(["--config", "models.json", "--standby-replicas", "-1"])
    assert exited.value.code == 2 and "--standby-replicas must be 0 or more" in capsys.readouterr().err


# ---- prism on a GPU of more models than fit (bench/one_gpu.py's setting) ---------------------------------


def one_gpu_of(weights: dict[str, int], memory: int = 80 * GB, **snapshot) -> ClusterSnapshot:
    return ClusterSnapshot(models=models(*weights), agents=(agent("x", 1, memory),), weight_bytes=weights, **snapshot)


def test_prism_switches_a_warm_model_off_on_an_oversubscribed_gpu_and_keeps_it_on_where_all_fit():
    # "idle" has had a burst (its window's rate) but nothing in the last seconds: warm. Beside 60 GB of
    # other models on an 80 GB GPU it stays on (all fit); beside 100 GB it goes off for the next burst.
    current = {"idle": [ReplicaTarget("x", (0,), True)], "busy": [ReplicaTarget("x", (0,), True)]}
    demand = {"idle": ModelDemand(arrival_rate=3.0, recent_arrival_rate=0.0), "busy": hot(3.0)}
    fits = one_gpu_of({"idle": 16 * GB, "busy": 16 * GB, "off": 28 * GB}, current=current, demand=demand)
    assert active_of(prism_policy(fits))["idle"] == [("x", (0,))]
    crowded = one_gpu_of({"idle": 16 * GB, "busy": 16 * GB, "off": 68 * GB}, current=current, demand=demand)
    assert active_of(prism_policy(crowded))["idle"] == []
    assert active_of(prism_policy(crowded))["busy"] == [("x", (0,))]


def test_prism_on_an_oversubscribed_gpu_leaves_a_model_of_a_few_requests_a_second_to_its_requests():
    # 1 req/s (window and recent): hot on a GPU whose models all fit, switched on by the plan; on an
    # oversubscribed one its requests switch it on (warm_rate_oversubscribed), the plan does not.
    demand = {"few": hot(1.0)}
    fits = one_gpu_of({"few": 16 * GB, "other": 16 * GB}, demand=demand)
    assert active_of(prism_policy(fits))["few"] == [("x", (0,))]
    crowded = one_gpu_of({"few": 16 * GB, "other": 70 * GB}, demand=demand)
    assert active_of(prism_policy(crowded))["few"] == []
    assert active_of(prism_policy(crowded, PolicyParams(warm_rate_oversubscribed=0.5)))["few"] == [("x", (0,))]


def test_prism_counts_a_model_whose_last_seconds_fell_below_the_warm_rate_as_cooling():
    # Its window still reads 3 req/s from a burst that ended; the last 10 s read 0.2 with a straggler
    # request now and then: cooling (warm), so on an oversubscribed GPU it is not kept on.
    current = {"cooling": [ReplicaTarget("x", (0,), True)]}
    weights = {"cooling": 16 * GB, "other": 70 * GB}
    cooling = ModelDemand(arrival_rate=3.0, recent_arrival_rate=0.2)
    assert active_of(prism_policy(one_gpu_of(weights, current=current, demand={"cooling": cooling})))["cooling"] == []
    rising = ModelDemand(arrival_rate=0.2, recent_arrival_rate=3.0)  # a burst starting: the window lags
    assert active_of(prism_policy(one_gpu_of(weights, current=current, demand={"cooling": rising})))["cooling"] == []
    steady = hot(3.0)
    assert active_of(prism_policy(one_gpu_of(weights, current=current, demand={"cooling": steady})))["cooling"] == [
        ("x", (0,))
    ]


def test_prism_puts_a_replica_a_model_is_short_of_where_it_stays_under_the_overload_bound():
    # "a" needs two replicas; both other GPUs already run models of a third of a GPU's compute each, so
    # no half of a's load fits under capacity (0.5) beside them: the second replica goes to the least
    # loaded of them, under the overload bound, rather than the one replica carrying all of a's load.
    weights = {"a": 2 * GB, "b": 2 * GB, "c": 2 * GB}
    agents = (agent("x", 1), agent("y", 1), agent("z", 1))
    current = {
        "a": [ReplicaTarget("x", (0,), True)],
        "b": [ReplicaTarget("y", (0,), True)],
        "c": [ReplicaTarget("z", (0,), True)],
    }
    snap = ClusterSnapshot(
        models=models("a", "b", "c"),
        agents=agents,
        weight_bytes=weights,
        current=current,
        demand={"a": busy(30.0), "b": busy(8.0), "c": busy(10.0)},
    )
    params = PolicyParams()
    loads = {m.model_name: compute_load(snap, m, params) for m in snap.models}
    assert params.compute_capacity + params.compute_margin < loads["a"] <= 2 * params.compute_capacity
    assert loads["b"] < loads["c"] and loads["b"] + loads["a"] / 2 > params.compute_capacity
    assert loads["b"] + loads["a"] / 2 <= params.compute_overload
    target = prism_policy(snap, params)
    assert sorted(active_of(target)["a"]) == [("x", (0,)), ("y", (0,))]


def test_prism_replicates_a_model_whose_queue_its_rates_do_not_show():
    # A 1B whose burst has just begun: its window's rate is low, and 180 requests wait behind the
    # ones running. Its queue counts as arrivals to drain within BACKLOG_DRAIN_S: replicas now,
    # not once the window's rate has caught up (a minute later).
    from services.scheduler.policies.prism import BACKLOG_DRAIN_S

    agents = tuple(agent(a, 1) for a in ("x", "y", "z"))
    current = {"small": [ReplicaTarget("x", (0,), True)]}

    def plan(queued: int) -> list[str]:
        demand = {
            "small": ModelDemand(
                arrival_rate=4.0,
                recent_arrival_rate=4.0,
                busy_fraction=1.0,
                queued=queued,
                running=256,
                mean_prompt_tokens=512,
                mean_output_tokens=128,
            )
        }
        snap = ClusterSnapshot(
            models=models("small"), agents=agents, weight_bytes={"small": 2 * GB}, current=current, demand=demand
        )
        return sorted(r.agent_id for r in prism_policy(snap)["small"] if r.active)

    assert plan(queued=0) == ["x"]
    assert len(plan(queued=int(40 * BACKLOG_DRAIN_S))) >= 2


def test_prism_keeps_a_replica_where_its_neighbours_load_rose_while_under_the_overload_bound():
    # "a" (0.75 of a GPU) runs two replicas, on x alone and on y beside "b", whose load has risen: its
    # share and b's now exceed capacity plus the margin on y, but not the overload bound. The replica
    # stays: moving it to the empty z costs a load and a drain, and moved it back when b's load fell.
    weights = {"a": 2 * GB, "b": 2 * GB}
    agents = (agent("x", 1), agent("y", 1), agent("z", 1))
    current = {
        "a": [ReplicaTarget("x", (0,), True), ReplicaTarget("y", (0,), True)],
        "b": [ReplicaTarget("y", (0,), True)],
    }
    snap = ClusterSnapshot(
        models=models("a", "b"),
        agents=agents,
        weight_bytes=weights,
        current=current,
        demand={"a": busy(30.0), "b": busy(12.0)},
    )
    params = PolicyParams()
    loads = {m.model_name: compute_load(snap, m, params) for m in snap.models}
    assert params.compute_capacity < loads["a"] <= 2 * params.compute_capacity
    assert params.compute_capacity + params.compute_margin < loads["b"] + loads["a"] / 2 <= params.compute_overload
    target = prism_policy(snap, params)
    assert sorted(active_of(target)["a"]) == [("x", (0,)), ("y", (0,))]
    assert active_of(target)["b"] == [("y", (0,))]
