"""make_room: which idle engines step aside so another's weights fit (pure),
and the agent doing it on a real CPU device with two tiny engines."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from services.gpu_agent.make_room import (
    ResidentEngine,
    engine_to_yield,
    engines_to_relieve,
    engines_to_switch_off,
)
from services.gpu_agent.memory_policy import DeviceMemorySnapshot, EngineMemoryDemand, kv_shortfall_bytes

GB = 1 << 30


def resident(model, gb, idle_s=100.0, serving=False, rate=0.0, waiting=False, priority=0, in_flight=1):
    return ResidentEngine(
        model=model,
        weight_bytes=int(gb * GB),
        idle_s=idle_s,
        serving=serving,
        recent_rate=rate,
        waiting=waiting,
        priority=priority,
        in_flight=in_flight,
    )


def test_nothing_is_switched_off_when_the_weights_fit():
    assert engines_to_switch_off([resident("a", 10)], need_bytes=4 * GB, free_bytes=5 * GB) == []


def test_the_longest_idle_go_first_and_only_as_many_as_needed():
    residents = [resident("recent", 8, idle_s=2), resident("old", 8, idle_s=300), resident("older", 2, idle_s=900)]
    # 6 GB short: "older" (2 GB) is not enough alone, "old" (8 GB) after it is.
    assert engines_to_switch_off(residents, need_bytes=16 * GB, free_bytes=10 * GB) == ["older", "old"]


def test_engines_with_requests_are_never_switched_off():
    residents = [resident("busy", 30, idle_s=1000, serving=True), resident("idle", 4, idle_s=1)]
    assert engines_to_switch_off(residents, need_bytes=8 * GB, free_bytes=5 * GB) == ["idle"]


def test_no_room_to_make_switches_nothing_off():
    residents = [resident("busy", 30, serving=True), resident("idle", 1)]
    assert engines_to_switch_off(residents, need_bytes=8 * GB, free_bytes=5 * GB) is None


def test_recently_used_engines_are_spared():
    residents = [resident("just-used", 8, idle_s=3), resident("quiet", 2, idle_s=30)]
    assert engines_to_switch_off(residents, need_bytes=4 * GB, free_bytes=1 * GB, min_idle_s=10) is None
    assert engines_to_switch_off(residents, need_bytes=2 * GB, free_bytes=1 * GB, min_idle_s=10) == ["quiet"]
    assert engines_to_switch_off(residents, need_bytes=4 * GB, free_bytes=1 * GB) == ["quiet", "just-used"]


def test_ties_are_broken_by_name_so_the_agent_and_the_simulator_agree():
    residents = [resident("b", 4, idle_s=float("inf")), resident("a", 4, idle_s=float("inf"))]
    assert engines_to_switch_off(residents, need_bytes=4 * GB, free_bytes=1 * GB) == ["a"]


# ---- KV pressure: idle engines give their weights' memory to the serving ones' KV ------------


def test_kv_shortfall_is_what_the_demand_wants_beyond_the_budget_in_whole_units():
    unit = 2 << 20
    engines = (
        EngineMemoryDemand("a", 1, used_bytes=0, demand_bytes=3 * unit + 1, limit_bytes=unit),
        EngineMemoryDemand("b", 1, used_bytes=2 * unit, demand_bytes=0, limit_bytes=2 * unit),
        EngineMemoryDemand("c", 1, used_bytes=0, demand_bytes=50 * unit, limit_bytes=unit, cap_bytes=5 * unit),
    )
    # a wants 4 units (rounded up), b holds 2, c is capped at 5: 11 units against a budget of 8.
    assert kv_shortfall_bytes(DeviceMemorySnapshot(8 * unit, unit, engines)) == 3 * unit
    assert kv_shortfall_bytes(DeviceMemorySnapshot(11 * unit, unit, engines)) == 0


def test_kv_pressure_switches_off_idle_engines_longest_idle_first_until_their_weights_cover_it():
    residents = [
        resident("serving", 16, idle_s=500, serving=True),
        resident("just-done", 6, idle_s=0.5),
        resident("idle", 3, idle_s=20),
        resident("idler", 2, idle_s=60),
    ]
    assert engines_to_relieve(residents, shortfall_bytes=1 * GB, min_idle_s=1.0) == ["idler"]
    assert engines_to_relieve(residents, shortfall_bytes=4 * GB, min_idle_s=1.0) == ["idler", "idle"]
    # Short of what the idle ones hold: each one still helps.
    assert engines_to_relieve(residents, shortfall_bytes=40 * GB, min_idle_s=1.0) == ["idler", "idle"]
    assert engines_to_relieve(residents, shortfall_bytes=40 * GB, min_idle_s=0.0) == ["idler", "idle", "just-done"]
    assert engines_to_relieve(residents, shortfall_bytes=0, min_idle_s=0.0) == []


def test_under_kv_pressure_a_trickle_beside_a_burst_gives_way():
    """The engine switched off though it serves: the lowest rate below 1 a second and ten times below the
    busiest, with nothing waiting and no higher priority than the busiest's; none where every engine is
    busy or the busiest is not ten times busier."""
    burst = resident("3b-burst", 6, idle_s=0, serving=True, rate=13.0)
    trickle = resident("8b-trickle", 16, idle_s=1, serving=True, rate=0.9)
    assert engine_to_yield([burst, trickle]) == "8b-trickle"
    slower = resident("1b-slower", 2, idle_s=3, serving=True, rate=0.3)
    assert engine_to_yield([burst, trickle, slower]) == "1b-slower"
    # Equal rates: the heavier goes (more memory for the burst).
    assert engine_to_yield([burst, resident("x", 2, rate=0.5), resident("y", 16, rate=0.5)]) == "y"
    assert engine_to_yield([resident("a", 6, rate=3.0), resident("b", 6, rate=2.0)]) is None  # both busy
    assert engine_to_yield([resident("a", 6, rate=5.0), resident("b", 16, rate=0.6)]) is None  # not 10x
    assert engine_to_yield([]) is None
    # A burst beginning (requests waiting) is not a trickle; nor is a model of higher priority.
    assert engine_to_yield([burst, resident("starting", 6, serving=True, rate=0.1, waiting=True)]) is None
    assert engine_to_yield([burst, resident("vip", 6, serving=True, rate=0.1, priority=3)]) is None
    # A burst's tail (no arrival for 10 s, 40 requests still running) is not a trickle either.
    assert engine_to_yield([burst, resident("tail", 6, serving=True, rate=0.0, in_flight=40)]) is None
    assert engine_to_yield([burst, resident("few", 6, serving=True, rate=0.0, in_flight=4)]) == "few"
    # nothing in flight: idle, left to the idle rule and its --relieve-idle-s
    assert engine_to_yield([burst, resident("idle", 6, rate=0.0, in_flight=0)]) is None


# ---- a real agent's service on the CPU device -------------------------------------------


async def two_models_one_fits(tmp_path) -> tuple[dict[str, str], float]:
    """Two tiny models "a" and "b", and a CPU device memory (GB) sized from the first engine: its
    weights and KV fit, a second one's weights do not."""
    from in_process_agent import InProcessAgent

    from prism.tiny_models import write_tiny_model

    paths = {name: str(write_tiny_model(tmp_path / name, arch="llama", seed=i)) for i, name in enumerate("ab")}
    async with InProcessAgent() as probe:
        await probe.load("a", paths["a"])
        weights = probe.manager.engines["a"].engine.weight_bytes
    return paths, weights * 1.6 / (1 << 30)


async def test_a_request_for_a_switched_off_model_makes_room_on_a_full_device(tmp_path):
    """Two tiny engines on a CPU device whose memory holds the weights of one:
    a request for the switched-off one switches the idle other off (instead
    of the activation failing for want of memory) and is served; a request
    for the first then switches it back the same way."""
    from in_process_agent import InProcessAgent

    from prism_client.v1 import agent_pb2, generate_pb2

    paths, memory_gb = await two_models_one_fits(tmp_path)
    # Sparing no recently used engine, so "b" (just served) can step aside for "a" below.
    async with InProcessAgent("agent-room", cpu_memory_gb=memory_gb, make_room_idle_s=0.0) as agent:
        for name, on in (("a", True), ("b", False)):
            status = await agent.load(name, paths[name], activate=on)
            assert status.state == (agent_pb2.ENGINE_STATE_ACTIVE if on else agent_pb2.ENGINE_STATE_INACTIVE)

        async def generate(model: str) -> str:
            responses = [
                r
                async for r in agent.stub.Generate(
                    generate_pb2.GenerateRequest(
                        request_id=f"room-{model}",
                        model=model,
                        prompt="Hello",
                        sampling=generate_pb2.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                    ),
                    timeout=60,
                )
            ]
            assert responses[-1].finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED
            return "".join(r.text for r in responses)

        engines = agent.manager.engines
        await generate("b")
        assert (engines["a"].state, engines["b"].state) == ("inactive", "active")
        await generate("a")
        assert (engines["a"].state, engines["b"].state) == ("active", "inactive")
        assert agent.coordinator.budget_violations == 0


async def test_a_switched_off_model_that_cannot_get_room_is_refused_at_once(tmp_path):
    """The same full device, but the active engine served a request within make_room_idle_s: it does not
    step aside, and the request for the switched-off model is refused at once with RESOURCE_EXHAUSTED saying
    why (it used to go on to copy its weights into memory the other holds), while the active one serves on."""
    from in_process_agent import InProcessAgent

    from prism_client.v1 import agent_pb2, generate_pb2

    paths, memory_gb = await two_models_one_fits(tmp_path)
    async with InProcessAgent("agent-full", cpu_memory_gb=memory_gb, make_room_idle_s=60.0) as agent:
        for name, on in (("a", True), ("b", False)):
            await agent.load(name, paths[name], activate=on)

        def request(model: str) -> generate_pb2.GenerateRequest:
            return generate_pb2.GenerateRequest(
                request_id=f"full-{model}",
                model=model,
                prompt="Hello",
                sampling=generate_pb2.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
            )

        served = [r async for r in agent.stub.Generate(request("a"), timeout=60)]
        assert served[-1].finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            _ = [r async for r in agent.stub.Generate(request("b"), timeout=60)]
        assert time.monotonic() - started < 5  # at once, not at a deadline
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "cannot be switched on now" in caught.value.details() and "'b'" in caught.value.details()
        engines = agent.manager.engines
        assert (engines["a"].state, engines["b"].state) == ("active", "inactive")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await agent.stub.ActivateModel(agent_pb2.ModelRequest(model="b"), timeout=30)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        served = [r async for r in agent.stub.Generate(request("a"), timeout=60)]
        assert served[-1].finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED
        assert agent.coordinator.budget_violations == 0


@pytest.mark.parametrize("loaded_active", [False, True], ids=["activated", "loaded-active"])
@pytest.mark.parametrize("a_stepped_aside", [True, False], ids=["a-idle", "a-busy"])
async def test_an_engine_is_switched_on_only_with_a_page_bundle_of_kv_for_each(
    tmp_path, a_stepped_aside, loaded_active
):
    """A KV budget (capped) that holds one page bundle: both weights fit, but beside a busy "a" the policy
    would give "b" no KV at all, and b's requests would wait as long as a's load lasted (found with the
    SIGTERM cluster test's budget lowered). So "b" is switched on (activated, or loaded active) only if idle
    "a" steps aside; otherwise it is refused at once with RESOURCE_EXHAUSTED saying why (loaded, it stays
    loaded and switched off), and "a" serves on."""
    from in_process_agent import InProcessAgent

    from prism.tiny_models import write_tiny_model
    from prism_client.v1 import agent_pb2, generate_pb2

    paths = {name: str(write_tiny_model(tmp_path / name, arch="llama", seed=i)) for i, name in enumerate("ab")}
    idle_s = 0.0 if a_stepped_aside else 60.0
    async with InProcessAgent("agent-kv-floor", make_room_idle_s=idle_s) as agent:
        await agent.load("a", paths["a"])
        bundle = agent.manager.engines["a"].engine.kv_bundle_bytes
        agent.coordinator.kv_budget_cap_bytes = bundle * 3 // 2
        await agent.coordinator.rebalance()
        served = [
            r
            async for r in agent.stub.Generate(
                generate_pb2.GenerateRequest(
                    request_id="floor-a",
                    model="a",
                    prompt="Hello",
                    sampling=generate_pb2.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True),
                ),
                timeout=60,
            )
        ]
        assert served[-1].finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED

        async def switch_b_on() -> agent_pb2.EngineStatus:
            if loaded_active:
                return await agent.load("b", paths["b"])
            await agent.load("b", paths["b"], activate=False)
            return await agent.stub.ActivateModel(agent_pb2.ModelRequest(model="b"), timeout=30)

        engines = agent.manager.engines
        if a_stepped_aside:
            assert (await switch_b_on()).state == agent_pb2.ENGINE_STATE_ACTIVE
            assert (engines["a"].state, engines["b"].state) == ("inactive", "active")
            assert engines["b"].memory_limit_bytes >= bundle
        else:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await switch_b_on()
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            details = caught.value.details()
            assert "cannot be switched on now" in details and "one KV page bundle for each engine" in details, details
            assert "KV budget capped at" in details, details
            assert (engines["a"].state, engines["b"].state) == ("active", "inactive")
            assert engines["a"].memory_limit_bytes >= bundle
        assert agent.coordinator.budget_violations == 0


async def test_a_trickle_engine_is_switched_off_for_a_busy_one_and_its_request_is_told_why(tmp_path):
    """A KV budget (capped) that the busy engine's requests need more of than it has, and nothing idle
    beside it: the engine serving one request (a trickle) is switched off, that request ends with
    RESOURCE_EXHAUSTED saying why, and the busy engine's requests all complete."""
    from in_process_agent import InProcessAgent

    from prism.tiny_models import write_tiny_model
    from prism_client.v1 import generate_pb2

    paths = {
        name: str(write_tiny_model(tmp_path / name, arch="llama", seed=i)) for i, name in enumerate(("busy", "trickle"))
    }
    async with InProcessAgent("agent-trickle") as agent:
        for name in ("busy", "trickle"):
            await agent.load(name, paths[name])
        bundle = agent.manager.engines["busy"].engine.kv_bundle_bytes
        agent.coordinator.kv_budget_cap_bytes = 2 * bundle
        await agent.coordinator.rebalance()
        # Rates are over the time since the engines' stats began: from here one request reads as under
        # 0.4 a second, sixteen as over 4.
        await asyncio.sleep(2.5)

        async def generate(model: str, i: int, tokens: int) -> list:
            request = generate_pb2.GenerateRequest(
                request_id=f"{model}-{i}",
                model=model,
                prompt="Hello there",
                sampling=generate_pb2.SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True),
            )
            return [r async for r in agent.stub.Generate(request, timeout=120)]

        busy = [asyncio.create_task(generate("busy", i, 240)) for i in range(16)]
        trickle = asyncio.create_task(generate("trickle", 0, 240))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await trickle
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = caught.value.details()
        assert "'trickle' was switched off" in details and "busier engines" in details, details
        for responses in await asyncio.gather(*busy):
            assert responses[-1].finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED
        assert agent.manager.engines["trickle"].state == "inactive"
        assert agent.manager.engines["busy"].state == "active"
        assert agent.coordinator.budget_violations == 0
