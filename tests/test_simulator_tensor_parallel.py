"""The simulator's models split over several GPUs (tp_size > 1), as the
agent runs them: one engine on each of its GPUs with its weight shard and a
fixed KV reservation taken on every one, an activation that needs room on
all of them first, steps on all of them at once."""

from __future__ import annotations

import pytest

import prism.simulator.cluster as sim_cluster
import prism.simulator.scheduler as sim_scheduler
from prism.simulator.engine import SimRequest
from prism.simulator.models import sim_model
from prism.simulator.profile import DEFAULT_PROFILE, LatencyProfile
from prism.simulator.runner import GB, EventLoop, SimSettings, simulate
from prism.workload.generator import BurstyGroupParams, bursty_group_trace
from prism.workload.replay import SloTargets
from services.common.placement_config import parse

SEVENTY_B = "bench/configs/llama-3.1-70b"
EIGHT_B = "bench/configs/llama-3.1-8b"
ONE_B = "bench/configs/llama-3.2-1b"


@pytest.fixture(scope="module")
def profile() -> LatencyProfile:
    return LatencyProfile.load(DEFAULT_PROFILE)


def config(*specs: tuple[str, str, list[int], bool]):
    """(name, config dir, gpu ids, on) per model."""
    return list(
        parse(
            [
                {
                    "model_name": n,
                    "model_path": path,
                    "tp_size": len(gpus),
                    "init_placements": [{"gpu_ids": gpus, "on": on}],
                }
                for n, path, gpus, on in specs
            ]
        ).models
    )


def cluster_of(profile, specs, num_gpus=4, memory=141 * GB, **kwargs):
    loop = EventLoop()
    models = {m.model_name: sim_model(m) for m in specs}
    cluster = sim_cluster.SimCluster(loop, profile, models, num_gpus, num_gpus, memory, **kwargs)
    sim_scheduler.SimScheduler(cluster, "static").replan(instant=True)
    engines = {e.name: e for e in cluster.engines()}
    return loop, cluster, engines


def test_a_split_model_holds_a_shard_of_its_weights_and_kv_heads_on_each_gpu():
    specs = config(("whole", SEVENTY_B, [0], False), ("split", SEVENTY_B, [0, 1, 2, 3], False))
    whole, split = (sim_model(m) for m in specs)
    assert split.shard_weight_bytes == whole.weight_bytes // 4 and whole.shard_weight_bytes == whole.weight_bytes
    assert split.kv_bytes_per_token * 4 == whole.kv_bytes_per_token
    # its fixed KV: the engine's 8 contexts in whole page bundles, or the load's limit
    fixed = split.fixed_kv_bytes()
    assert fixed % split.bundle_bytes == 0 and fixed >= 8 * split.max_context * split.kv_bytes_per_token
    assert split.fixed_kv_bytes(5 * GB) == 5 * GB
    with pytest.raises(ValueError, match="does not divide its 8 key/value heads"):
        sim_model(config(("odd", SEVENTY_B, [0, 1, 2], False))[0])


def test_a_split_engine_takes_its_shard_and_fixed_kv_on_every_gpu_and_the_policy_plans_the_rest(profile):
    loop, cluster, engines = cluster_of(
        profile, config(("big", SEVENTY_B, [0, 1, 2, 3], True), ("small", EIGHT_B, [1], True))
    )
    big, small = engines["big"], engines["small"]
    assert big.gpus == (0, 1, 2, 3) and big.split and not small.split
    devices = cluster.agents["agent-1"].devices
    assert all(big in devices[g].engines for g in range(4)) and small in devices[1].engines
    assert big.limit_bytes == big.model.fixed_kv_bytes()
    for g in range(4):
        snapshot = cluster.memory_snapshot(devices[g])
        taken = big.model.shard_weight_bytes + big.limit_bytes + (small.model.weight_bytes if g == 1 else 0)
        assert snapshot.budget_bytes == devices[g].memory_bytes - devices[g].reserve_bytes - taken
        # only the unsplit engine's KV is planned (the split one's is fixed)
        assert [e.model for e in snapshot.engines] == (["small"] if g == 1 else [])
    assert 0 < small.limit_bytes <= cluster.memory_snapshot(devices[1]).budget_bytes


def test_a_split_activation_needs_room_on_every_gpu_and_switches_nothing_off_without_it(profile):
    """GPU 3 is full of a busy engine's weights: the split model cannot come on, and the idle engine
    on GPU 0, which would have stepped aside for it, stays on. With GPU 3 free it steps aside."""
    for busy_gpu3 in (True, False):
        specs = config(
            ("big", SEVENTY_B, [0, 1, 2, 3], False), ("idle", SEVENTY_B, [0], True), ("busy", SEVENTY_B, [3], True)
        )
        loop, cluster, engines = cluster_of(profile, specs)
        big, idle, busy = engines["big"], engines["idle"], engines["busy"]
        if not busy_gpu3:
            cluster.deactivate(busy)
        else:
            busy.last_arrival = 0.0  # a request just now: it does not step aside
        request = SimRequest(index=0, model="big", t=0.0, prompt_tokens=100, output_tokens=2)
        big.pending.append(request)
        cluster.activate(big)
        if busy_gpu3:
            assert big.state == "inactive" and idle.state == "active" and busy.state == "active"
            assert request.error is not None and request.error.startswith("RESOURCE_EXHAUSTED")
        else:
            assert big.state == "activating" and idle.state == "inactive"
            loop.run(until=10.0)
            assert big.state == "active" and request.done and request.error is None


def test_a_split_step_is_priced_by_the_busiest_of_its_gpus(profile):
    """A lone decode step of the split model takes the profile's time for its shard's size (times the
    factor); with another engine stepping on one of its GPUs it is shared as that GPU is."""
    for factor in (1.0, 3.0):
        loop, cluster, engines = cluster_of(
            profile,
            config(("big", SEVENTY_B, [0, 1, 2, 3], True), ("small", ONE_B, [2], True)),
            split_step_factor=factor,
        )
        big = engines["big"]
        alone = SimRequest(index=0, model="big", t=0.0, prompt_tokens=200, output_tokens=1)
        cluster.arrive(alone)
        loop.run(until=30.0)
        expected = factor * profile.prefill_s(big.model.shard_weight_bytes, 200)
        assert alone.first_token_at == pytest.approx(expected, rel=1e-9)
        shared = SimRequest(index=1, model="big", t=loop.now, prompt_tokens=200, output_tokens=1)
        neighbour = SimRequest(index=2, model="small", t=loop.now, prompt_tokens=4000, output_tokens=1)
        cluster.arrive(neighbour)
        cluster.arrive(shared)
        loop.run(until=loop.now + 30.0)
        assert shared.first_token_at - shared.t == pytest.approx(2 * expected, rel=1e-9)  # parallelism 1: halved


def test_a_trace_with_a_split_model_runs_under_every_policy(profile):
    """Issue 9's setting scaled to 4 GPUs: the 70B config over all four beside 1B and 8B models; every
    request ends (none unfinished), the same trace gives the same result twice, and a slower split
    engine serves the 70B's tokens slower."""
    specs = config(
        ("big", SEVENTY_B, [0, 1, 2, 3], False), *[(f"m{i}", (ONE_B, EIGHT_B)[i % 2], [i % 4], False) for i in range(5)]
    )
    names = [m.model_name for m in specs]
    trace = bursty_group_trace(
        BurstyGroupParams(
            num_models=len(names), num_groups=2, shift_s=10, rate=6.0, idle_fraction=0.05, duration_s=20, seed=1
        ),
        names,
    )
    slo = SloTargets(1.0, 0.1)
    for policy in ("static", "time-share", "prism"):
        settings = SimSettings(num_gpus=4, gpus_per_agent=4, policy=policy, gpu_memory_bytes=141 * GB)
        first = simulate(trace, specs, profile, settings, slo)
        assert first == simulate(trace, specs, profile, settings, slo)
        assert not any(r["error"] and r["error"].startswith("UNFINISHED") for r in first["requests"]), policy
    fast = simulate(
        trace,
        specs,
        profile,
        SimSettings(num_gpus=4, gpus_per_agent=4, policy="static", gpu_memory_bytes=141 * GB),
        slo,
    )
    slow = simulate(
        trace,
        specs,
        profile,
        SimSettings(num_gpus=4, gpus_per_agent=4, policy="static", gpu_memory_bytes=141 * GB, split_step_factor=5.0),
        slo,
    )
    assert fast["per_model"]["big"]["requests"] > 0
    assert slow["per_model"]["big"]["tpot_p50_s"] > 2 * fast["per_model"]["big"]["tpot_p50_s"]
