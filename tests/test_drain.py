"""Removing a replica drains it: on a real agent (its gRPC service over a real
engine of a tiny model on the CPU) an unload lets the streams in flight
finish and then the engine goes, or, past the drain timeout, ends them with
an error that says so; the scheduler's plan drains a replica whose model
stays placed elsewhere, unloads a model placed nowhere at once, does not
unload a draining engine twice and loads one it wants back (the agent
cancels the drain); the gateway's router sends a placed model with no servable replica to its
draining engine (a real etcd); the simulator drains alike."""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest
from in_process_agent import InProcessAgent

from prism.simulator.cluster import SimCluster
from prism.simulator.engine import SimRequest
from prism.simulator.models import sim_model
from prism.simulator.profile import DEFAULT_PROFILE, LatencyProfile
from prism.simulator.runner import GB, EventLoop
from prism.tiny_models import write_tiny_model
from prism_client.v1 import agent_pb2, generate_pb2
from services.common import records
from services.common.etcd import connect
from services.common.grpc_util import DRAINING_KEY
from services.common.placement_config import parse
from services.common.records import EngineRecord
from services.gateway.errors import ModelNotFound, ModelUnavailable
from services.gateway.relay import Relay
from services.gateway.router import Router
from services.scheduler.actions import Action, current_placement, plan_actions
from services.scheduler.policies import ReplicaTarget

# ---- the agent ---------------------------------------------------------------------------


class Agent(InProcessAgent):
    """A real agent's gRPC service (in_process_agent.py) with model "m" loaded, publishing its engines'
    states (and to etcd, when given one, with the agent's record, as the agent process does)."""

    def __init__(self, model_path: str, drain_timeout_s: float, etcd=None, agent_id: str = "agent-t"):
        super().__init__(agent_id, drain_timeout_s=drain_timeout_s, publish=self._publish)
        self.model_path = model_path
        self.etcd = etcd
        self.published: list[tuple[str, str]] = []  # (model, state) as it goes to etcd

    async def _publish(self, managed) -> None:
        self.published.append((managed.spec.name, managed.published_state))
        if self.etcd is not None:
            record = records.EngineRecord(self.agent_id, managed.spec.name, managed.published_state, [0])
            if managed.state == "unloaded":
                await self.etcd.delete(record.key().encode())
            else:
                await self.etcd.put(record.key().encode(), record.to_json())

    async def __aenter__(self) -> Agent:
        await self.start()
        if self.etcd is not None:
            agent = records.AgentRecord(self.agent_id, self.address)
            await self.etcd.put(agent.key().encode(), agent.to_json())
        status = await self.load("m", self.model_path)
        assert status.state == agent_pb2.ENGINE_STATE_ACTIVE, status
        return self

    def admission_queued(self) -> int:
        return self.admission.queued("m")

    def stream(self, i: int, max_tokens: int):
        return self.stub.Generate(
            generate_pb2.GenerateRequest(
                request_id=f"d{i}",
                model="m",
                prompt=f"Hello number {i}",
                sampling=generate_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
            ),
            timeout=120,
        )


async def read_all(call) -> tuple[int, int]:
    """(responses, completion tokens at the end) of a stream that must finish."""
    n, last = 0, None
    while (response := await call.read()) is not grpc.aio.EOF:
        n, last = n + 1, response
    assert last is not None and last.finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED
    return n, last.usage.completion_tokens


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return str(write_tiny_model(tmp_path_factory.mktemp("drain") / "m", arch="llama"))


async def test_an_unload_lets_the_streams_in_flight_finish_then_the_engine_goes(model_path):
    async with Agent(model_path, drain_timeout_s=60) as agent:
        calls = [agent.stream(i, max_tokens=40) for i in range(4)]
        for call in calls:  # every stream has started: its first output is here
            await call.read()
        status = await agent.stub.UnloadModel(agent_pb2.ModelRequest(model="m"), timeout=10)
        assert status.state == agent_pb2.ENGINE_STATE_DRAINING
        assert ("m", "draining") in agent.published
        rest = await asyncio.gather(*(read_all(call) for call in calls))
        assert [tokens for _, tokens in rest] == [40] * 4  # every stream whole
        deadline = time.monotonic() + 10
        # Unloaded once it is published so (after the engine stopped, which follows its removal here).
        while agent.published[-1] != ("m", "unloaded"):
            assert time.monotonic() < deadline, "the drained engine was not unloaded"
            await asyncio.sleep(0.05)
        assert "m" not in agent.manager.engines
        listed = await agent.stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=5)
        assert [e.model for e in listed.engines] == []


async def test_a_drain_past_its_timeout_ends_the_requests_left_with_an_explicit_error(model_path):
    # A timeout of 0 ends the drain at once, with the stream still in flight: any longer one
    # races the tiny model's 250 tokens, which an idle machine streams in under 0.2 s.
    async with Agent(model_path, drain_timeout_s=0) as agent:
        call = agent.stream(0, max_tokens=250)
        await call.read()
        started = time.monotonic()
        status = await agent.stub.UnloadModel(agent_pb2.ModelRequest(model="m"), timeout=10)
        assert status.state == agent_pb2.ENGINE_STATE_DRAINING
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while await call.read() is not grpc.aio.EOF:
                pass
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "drain timeout of 0s" in caught.value.details() and "d0" in caught.value.details()
        assert time.monotonic() - started < 10
        assert "m" not in agent.manager.engines


async def test_a_load_of_the_draining_model_cancels_its_drain(model_path):
    async with Agent(model_path, drain_timeout_s=60) as agent:
        call = agent.stream(0, max_tokens=40)
        await call.read()
        status = await agent.stub.UnloadModel(agent_pb2.ModelRequest(model="m"), timeout=10)
        assert status.state == agent_pb2.ENGINE_STATE_DRAINING
        status = await agent.stub.LoadModel(
            agent_pb2.LoadModelRequest(spec=agent_pb2.ModelSpec(name="m", path=model_path), gpu_ids=[0], activate=True),
            timeout=30,
        )
        assert status.state == agent_pb2.ENGINE_STATE_ACTIVE
        managed = agent.manager.engines["m"]
        tasks = asyncio.all_tasks()  # a drain task left running would unload it once the call ends
        assert managed.drain_task is None and not managed.draining
        assert not [t for t in tasks if t.get_name() == "drain-m" and not t.done() and not t.cancelling()]
        assert (await read_all(call))[1] == 40
        assert agent.manager.engines["m"] is managed and managed.state == "active"
        assert agent.published[-1] == ("m", "active")


async def test_a_forced_unload_is_immediate(model_path):
    async with Agent(model_path, drain_timeout_s=60) as agent:
        call = agent.stream(0, max_tokens=250)
        await call.read()
        await agent.stub.UnloadModel(agent_pb2.ModelRequest(model="m", force=True), timeout=10)
        assert "m" not in agent.manager.engines
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while await call.read() is not grpc.aio.EOF:
                pass
        assert not any(key == DRAINING_KEY for key, _ in caught.value.trailing_metadata() or ())
        # Unloaded under it, not an engine failure: UNAVAILABLE, saying why.
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "was unloaded from this agent while the request was in flight" in caught.value.details()


@contextlib.asynccontextmanager
async def routed(etcd_server):
    """A real etcd client and the gateway's router watching it; both closed at the end."""
    etcd = await connect(etcd_server.endpoint)
    router = Router(etcd_server.endpoint, channel_close_grace_s=0.1)
    task = asyncio.create_task(router.run())
    try:
        yield etcd, router
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await router.close()
        await etcd.close()


async def place(etcd, model_path: str, agent_ids: list[str], revision: int) -> None:
    """Model m in the registry, placed on `agent_ids` (one replica each, GPU 0)."""
    model = records.ModelRecord(name="m", path=model_path)
    await etcd.put(model.key().encode(), model.to_json())
    placement = records.PlacementRecord("m", [vars(records.Replica(a, [0])) for a in agent_ids], revision=revision)
    await etcd.put(placement.key().encode(), placement.to_json())


async def until_routed(router: Router, addresses: list[str], timeout_s: float = 10) -> None:
    """Until the router's watch routes m to exactly `addresses`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if sorted(router.candidates("m")) == sorted(addresses):
                return
        except (ModelNotFound, ModelUnavailable):
            pass
        assert time.monotonic() < deadline, f"the router never routed m to {addresses}"
        await asyncio.sleep(0.02)


async def test_requests_queued_at_a_draining_engine_go_back_through_the_gateway_to_the_new_replica(
    model_path, etcd_server, caplog
):
    """Two real agents and the gateway's router and relay over a real etcd: m moves from `old` to `new` while
    `old` has requests running and more waiting in its admission queue (its KV budget capped to one page
    bundle). The running ones finish on `old`; the waiting ones are sent back unstarted and the relay gives
    them to `new`; every request completes whole."""
    caplog.set_level("INFO", logger="services.gateway.relay")
    async with routed(etcd_server) as (etcd, router):
        async with Agent(model_path, 60, etcd, "old") as old, Agent(model_path, 60, etcd, "new") as new:
            await place(etcd, model_path, ["old"], revision=1)
            await asyncio.wait_for(router.wait_ready(), 10)
            await until_routed(router, [old.address])  # the model, its placement and old's engine
            engine = old.manager.engines["m"].engine
            old.coordinator.kv_budget_cap_bytes = engine.kv_bundle_bytes  # room for about three of the prompts
            await old.coordinator.rebalance()
            relay = Relay(router, timeout_s=120)

            async def one(i: int) -> tuple[str, int]:
                stream = await relay.open(
                    generate_pb2.GenerateRequest(
                        request_id=f"q{i}",
                        model="m",
                        prompt="hello " * 90,
                        sampling=generate_pb2.SamplingParams(max_tokens=100, temperature=0, ignore_eos=True),
                    )
                )
                last = None
                async for response in stream:
                    last = response
                assert last.finish_reason == generate_pb2.FINISH_REASON_LENGTH
                return stream.address, last.usage.completion_tokens

            requests = [asyncio.create_task(one(i)) for i in range(8)]
            deadline = time.monotonic() + 30
            while not old.admission_queued():
                assert time.monotonic() < deadline, "no request waited in the old agent's admission queue"
                await asyncio.sleep(0.005)
            await place(etcd, model_path, ["new"], revision=2)
            await until_routed(router, [new.address])
            status = await old.stub.UnloadModel(agent_pb2.ModelRequest(model="m"), timeout=10)
            assert status.state == agent_pb2.ENGINE_STATE_DRAINING
            served = await asyncio.wait_for(asyncio.gather(*requests), 120)
            assert [tokens for _, tokens in served] == [100] * 8
            where = [address for address, _ in served]
            assert old.address in where and new.address in where, where
            assert any("sent back by the draining engine" in r.getMessage() for r in caplog.records)
            deadline = time.monotonic() + 10
            while "m" in old.manager.engines:
                assert time.monotonic() < deadline, "the drained engine was not unloaded"
                await asyncio.sleep(0.05)


class StaleRecordAgent(Agent):
    """An agent whose engine record stays in etcd once `keep_records` is set and the engine is unloaded:
    the moment between an agent unloading a model and the gateways' routing seeing it."""

    keep_records = False

    async def _publish(self, managed) -> None:
        if self.keep_records and managed.state == "unloaded":
            self.published.append((managed.spec.name, managed.published_state))
            return
        await super()._publish(managed)


async def test_a_request_routed_to_an_agent_that_just_unloaded_the_model_goes_to_another_replica(
    model_path, etcd_server
):
    """The gateway's routing still lists a replica whose agent has unloaded the model (shed, moved): that
    agent answers NOT_FOUND, and the relay routes the request again, to the live replica, instead of telling
    the client the model does not exist; with no other replica the client gets 503, not 404."""
    async with routed(etcd_server) as (etcd, router):
        async with (
            StaleRecordAgent(model_path, 60, etcd, "stale") as stale,
            Agent(model_path, 60, etcd, "live") as live,
        ):
            await place(etcd, model_path, ["stale", "live"], revision=1)
            await asyncio.wait_for(router.wait_ready(), 10)
            await until_routed(router, [stale.address, live.address])
            stale.keep_records = True
            await stale.stub.UnloadModel(agent_pb2.ModelRequest(model="m", force=True), timeout=10)
            assert "m" not in stale.manager.engines
            assert sorted(router.candidates("m")) == sorted([stale.address, live.address])  # the stale view
            relay = Relay(router, timeout_s=60)

            def request(i: int) -> generate_pb2.GenerateRequest:
                return generate_pb2.GenerateRequest(
                    request_id=f"s{i}",
                    model="m",
                    prompt="hello",
                    sampling=generate_pb2.SamplingParams(max_tokens=5, temperature=0, ignore_eos=True),
                )

            for i in range(4):  # round robin over the two: half of them try the stale one first
                stream = await relay.open(request(i))
                last = None
                async for response in stream:
                    last = response
                assert stream.address == live.address
                assert last.finish_reason == generate_pb2.FINISH_REASON_LENGTH and last.usage.completion_tokens == 5
            assert router._in_flight == {}  # the relay told the router of every attempt's end, bounced or not
            await place(etcd, model_path, ["stale"], revision=2)
            await until_routed(router, [stale.address])
            with pytest.raises(ModelUnavailable):
                await relay.open(request(9))


# ---- the scheduler's plan ------------------------------------------------------------------


def test_plan_does_not_unload_a_draining_engine_again_and_loads_one_wanted_back():
    engines = {
        ("a1", "m"): EngineRecord("a1", "m", "draining", [0]),
        ("a2", "m"): EngineRecord("a2", "m", "active", [0]),
        ("a1", "n"): EngineRecord("a1", "n", "draining", [0]),
    }
    target = {"m": [ReplicaTarget("a2", (0,), True)], "n": [ReplicaTarget("a1", (0,), True)]}
    assert plan_actions(target, engines, {"a1", "a2"}) == [Action("load", "a1", "n", (0,))]
    assert current_placement(engines) == {"m": [ReplicaTarget("a2", (0,), True)]}


def test_plan_drains_a_replica_of_a_model_placed_elsewhere_and_drops_an_unplaced_model_at_once():
    engines = {
        ("a1", "m"): EngineRecord("a1", "m", "active", [0]),
        ("a2", "m"): EngineRecord("a2", "m", "active", [0]),
        ("a1", "gone"): EngineRecord("a1", "gone", "active", [0]),
    }
    target = {"m": [ReplicaTarget("a2", (0,), True)], "gone": []}
    assert plan_actions(target, engines, {"a1", "a2"}) == [
        Action("unload", "a1", "gone", drain=False),
        Action("unload", "a1", "m", drain=True),
    ]


# ---- the gateway's router ------------------------------------------------------------------


async def test_router_sends_a_placed_model_with_no_servable_replica_to_its_draining_engine(etcd_server):
    etcd = await connect(etcd_server.endpoint)
    router = Router(etcd_server.endpoint, channel_close_grace_s=0.1)
    task = asyncio.create_task(router.run())
    try:
        await asyncio.wait_for(router.wait_ready(), 10)

        async def put(record) -> None:
            await etcd.put(record.key().encode(), record.to_json())

        await put(records.ModelRecord(name="m", path="/m"))
        for agent_id, port in (("old", 1), ("new", 2)):
            await put(records.AgentRecord(agent_id, f"127.0.0.1:{port}"))
        await put(records.EngineRecord("old", "m", "draining"))
        await put(records.PlacementRecord("m", [vars(records.Replica("new", [0]))]))
        await put(records.EngineRecord("new", "m", "loading"))

        async def candidates_become(wanted) -> None:
            deadline = time.monotonic() + 5
            while True:
                try:
                    got = router.candidates("m")
                except (ModelNotFound, ModelUnavailable) as exc:  # not seen yet, or no live replica
                    got = exc
                if got == wanted or (isinstance(wanted, type) and isinstance(got, wanted)):
                    return
                assert time.monotonic() < deadline, f"candidates {got!r}, wanted {wanted!r}"
                await asyncio.sleep(0.02)

        await candidates_become(["127.0.0.1:1"])  # the new replica loads: the draining one serves meanwhile
        await put(records.EngineRecord("new", "m", "active"))
        await candidates_become(["127.0.0.1:2"])  # servable: the draining one gets nothing more
        await put(records.PlacementRecord("m", [], revision=2))
        await put(records.EngineRecord("new", "m", "draining"))
        await candidates_become(ModelUnavailable)  # placed nowhere: its policy left it out, no fallback
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await router.close()
        await etcd.close()


# ---- the simulator -------------------------------------------------------------------------


def sim_move(drain_timeout_s: float, output_tokens: int):
    """Model m on agent-1's GPU with 6 requests streaming; then moved to agent-2 as the scheduler does it (the
    placement first, then the load there and the unload here); 4 more requests arrive while agent-2 loads."""
    loop = EventLoop()
    config = parse(
        [{"model_name": "m", "model_path": "bench/configs/llama-3.2-1b", "init_placements": [{"gpu_ids": [0]}]}]
    ).models[0]
    cluster = SimCluster(
        loop,
        LatencyProfile.load(DEFAULT_PROFILE),
        {"m": sim_model(config)},
        num_gpus=2,
        gpus_per_agent=1,
        gpu_memory_bytes=80 * GB,
        drain_timeout_s=drain_timeout_s,
    )
    done: list[SimRequest] = []
    cluster.on_done = done.append
    cluster.set_placement({"m": [ReplicaTarget("agent-1", (0,), True)]})
    cluster.load("agent-1", "m", (0,), True, 0, instant=True)
    first = [SimRequest(i, "m", 0.0, 200, output_tokens) for i in range(6)]
    for r in first:
        cluster.arrive(r)
    loop.run(until=0.1)
    old = cluster.agents["agent-1"].engines["m"]
    assert all(r.first_token_at is not None and not r.done for r in first)  # streaming
    cluster.set_placement({"m": [ReplicaTarget("agent-2", (0,), True)]})
    cluster.load("agent-2", "m", (0,), True, 0)
    cluster.unload("agent-1", "m")
    later = [SimRequest(10 + i, "m", 0.1, 50, 5) for i in range(4)]
    for r in later:
        cluster.arrive(r)
    return loop, cluster, old, first, later, done


def test_simulator_a_move_loses_no_request_and_the_old_engine_goes_when_empty():
    loop, cluster, old, first, later, done = sim_move(drain_timeout_s=30.0, output_tokens=2000)
    assert old.draining and cluster.stats["drains"] == 1
    assert all(r.engine is old for r in later)  # agent-2 still loads: the draining engine serves them
    loop.run(until=60.0)
    assert len(done) == 10 and all(r.error is None and r.tokens == r.output_tokens for r in done)
    assert old.state == "unloaded" and "m" not in cluster.agents["agent-1"].engines
    assert cluster.stats["drain_timeouts"] == 0
    new = cluster.agents["agent-2"].engines["m"]
    fresh = SimRequest(99, "m", loop.now, 50, 5)
    cluster.arrive(fresh)
    assert fresh.engine is new


def test_simulator_a_drain_past_its_timeout_fails_what_is_left_explicitly():
    loop, cluster, old, first, later, done = sim_move(drain_timeout_s=1.0, output_tokens=4000)
    loop.run(until=120.0)
    assert cluster.stats["drain_timeouts"] == 1 and old.state == "unloaded"
    assert all(r.error is not None and "drain timeout of 1s" in r.error for r in first)
    assert all(r.error is None for r in later)  # short: they finished on the draining engine in time
