"""The gateway's Router against a real etcd (the `etcd_server` fixture):
which replicas are live, round robin, model listing, agent channels."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from services.common import records
from services.common.etcd import connect
from services.gateway.errors import GatewayError, ModelNotFound, ModelUnavailable
from services.gateway.router import GatewayNotReady, Router


async def eventually(check, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            check()
            return
        except (AssertionError, GatewayError):  # records of one change arrive over several watches
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)


@pytest.fixture()
async def etcd(etcd_server):
    client = await connect(etcd_server.endpoint)
    yield client
    await client.close()


@pytest.fixture()
async def router(etcd_server) -> AsyncIterator[Router]:
    router = Router(etcd_server.endpoint, channel_close_grace_s=0.1)
    task = asyncio.create_task(router.run())
    await asyncio.wait_for(router.wait_ready(), 10)
    yield router
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await router.close()


async def put(etcd, key: str, value: bytes) -> None:
    await etcd.put(key.encode(), value)


async def place(
    etcd, model: str, replicas: dict[str, str | None], state: str = "active", max_context: int = 128
) -> None:
    """`model` placed on agents (agent_id -> address; None: the agent is not registered)."""
    await put(etcd, records.MODELS + model, records.ModelRecord(name=model, path="/m").to_json())
    for agent_id, address in replicas.items():
        if address is not None:
            await put(etcd, records.AGENTS + agent_id, records.AgentRecord(agent_id, address).to_json())
        engine = records.EngineRecord(agent_id=agent_id, model=model, state=state, max_context=max_context)
        await put(etcd, engine.key(), engine.to_json())
    placement = records.PlacementRecord(model=model, replicas=[{"agent_id": a, "gpu_ids": [0]} for a in replicas])
    await put(etcd, placement.key(), placement.to_json())


async def test_not_ready_before_etcd_is_loaded():
    router = Router("127.0.0.1:1")
    assert not router.ready and not router.has_model("m")
    with pytest.raises(GatewayNotReady):
        router.route("m")
    with pytest.raises(GatewayNotReady):
        router.list_models()


async def test_unknown_model_is_not_found(router):
    with pytest.raises(ModelNotFound):
        router.route("nothing")


async def test_model_without_placement_is_unavailable(router, etcd):
    await put(etcd, records.MODELS + "m", records.ModelRecord(name="m", path="/m").to_json())
    await eventually(lambda: assert_has(router, "m"))
    with pytest.raises(ModelUnavailable, match=r"has no live replica.*not placed"):
        router.route("m")


def assert_has(router: Router, model: str) -> None:
    assert router.has_model(model)


async def test_round_robin_over_live_replicas(router, etcd):
    await place(etcd, "m", {"a1": "10.0.0.1:1", "a2": "10.0.0.2:1"})
    await eventually(lambda: assert_picks(router, "m", 2))
    picks = [router.route("m") for _ in range(4)]
    assert sorted(picks) == ["10.0.0.1:1", "10.0.0.1:1", "10.0.0.2:1", "10.0.0.2:1"]
    assert picks[0] != picks[1] and picks[0] == picks[2]
    assert len(router.candidates("m")) == 2  # the others follow as fallbacks


async def test_the_replica_with_the_fewest_requests_in_flight_goes_first(router, etcd):
    """A replica that has just come up beside a busy one takes the new requests (the relay tells the
    router when a request begins and ends on a replica)."""
    await place(etcd, "m", {"a1": "10.0.0.1:1", "a2": "10.0.0.2:1"})
    await eventually(lambda: assert_picks(router, "m", 2))
    busy, fresh = "10.0.0.1:1", "10.0.0.2:1"
    for _ in range(3):
        router.began("m", busy)
    assert [router.route("m") for _ in range(4)] == [fresh] * 4
    router.began("m", fresh)
    assert router.candidates("m") == [fresh, busy]  # still fewer there; the busy one is the fallback
    for _ in range(3):
        router.ended("m", busy)
    assert router.route("m") == busy  # now it has none
    router.ended("m", fresh)
    assert sorted(router.route("m") for _ in range(4)) == [busy, busy, fresh, fresh]  # equals: round robin


async def test_a_switched_off_replica_gets_requests_only_when_none_is_active(router, etcd):
    """The scheduler switches replicas on and off (a standby waits switched off): the gateway sends
    to an active one, however busy, and to a switched-off one, which its agent switches on, only
    while none is active; it stays a fallback."""
    await place(etcd, "m", {"on": "10.0.0.1:1", "off": "10.0.0.2:1"})
    standby = records.EngineRecord(agent_id="off", model="m", state="inactive", max_context=128)
    for _ in range(5):
        router.began("m", "10.0.0.1:1")
    await put(etcd, standby.key(), standby.to_json())
    # The busy active replica first: only once the router has seen the standby's record (before, the two
    # look alike and the idle one would come first; waiting for the order before the load made it busy
    # could pass on that older view, and the picks below then went to the standby).
    await eventually(lambda: assert_candidates(router, "m", ["10.0.0.1:1", "10.0.0.2:1"]))
    assert [router.route("m") for _ in range(3)] == ["10.0.0.1:1"] * 3
    switched_off = records.EngineRecord(agent_id="on", model="m", state="inactive", max_context=128)
    await put(etcd, switched_off.key(), switched_off.to_json())
    await eventually(lambda: assert_candidates(router, "m", ["10.0.0.2:1", "10.0.0.1:1"]))  # both off: least busy


def assert_candidates(router: Router, model: str, expected: list[str]) -> None:
    assert router.candidates(model) == expected


def test_least_busy_first_breaks_ties_round_robin_and_route_order_puts_active_replicas_first():
    from services.common.routing import least_busy_first, route_order

    counts = {"a": 2, "b": 0, "c": 0, "d": 1}
    assert least_busy_first(list(counts), counts.get, 0) == ["b", "c", "d", "a"]
    assert least_busy_first(list(counts), counts.get, 3) == ["b", "c", "d", "a"]
    assert least_busy_first(list(counts), counts.get, 2) == ["c", "b", "d", "a"]  # the turn starts at c
    assert [least_busy_first(["x", "y", "z"], lambda _: 0, t)[0] for t in range(4)] == ["x", "y", "z", "x"]
    assert least_busy_first([], counts.get, 1) == []
    # route_order: the active ones, however busy, before the switched-off ones.
    assert route_order(list(counts), lambda r: r in ("a", "d"), counts.get, 0) == ["d", "a", "b", "c"]
    assert route_order(list(counts), lambda r: False, counts.get, 0) == ["b", "c", "d", "a"]


def test_requests_that_begin_alike_go_to_their_home_replica_while_its_load_allows():
    from services.common.routing import AFFINITY_LOAD_BOUND, prefix_home, route_order

    replicas = ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1", "10.0.0.4:1"]
    idle = dict.fromkeys(replicas, 0)
    keys = [f"system prompt {i}" for i in range(200)]
    homes = {k: prefix_home(replicas, k) for k in keys}
    # Every key has one home, taken first whatever the turn; the keys spread over the replicas.
    for key in keys[:20]:
        assert {route_order(replicas, lambda r: True, idle.get, turn, key)[0] for turn in range(4)} == {homes[key]}
    assert min(list(homes.values()).count(r) for r in replicas) > 200 / 4 / 2
    # A replica that goes moves only the keys it was home of (rendezvous hashing).
    fewer = replicas[:3]
    assert all(prefix_home(fewer, k) == homes[k] for k in keys if homes[k] != replicas[3])
    # Loaded past the bound, the home gives way to the least busy; within it, it keeps its requests.
    key = keys[0]
    home = homes[key]
    others = [r for r in replicas if r != home]
    busy = {**dict.fromkeys(others, 4), home: int(AFFINITY_LOAD_BOUND * 5) + 2}
    assert route_order(replicas, lambda r: True, busy.get, 0, key)[0] != home
    within = {**dict.fromkeys(others, 4), home: 6}
    assert route_order(replicas, lambda r: True, within.get, 0, key)[0] == home
    # Only among the active replicas: a switched-off home is not switched on for its prefix.
    assert route_order(replicas, lambda r: r != home, idle.get, 0, key)[0] != home
    assert route_order(replicas, lambda r: True, idle.get, 0, None) == replicas  # no key: least busy, in turn


def test_the_prefix_key_is_the_beginning_of_the_prompt_or_of_the_chat():
    from prism_client.v1 import generate_pb2
    from services.gateway.relay import PREFIX_KEY_CHARS, prefix_key

    long_prompt = "You are a careful assistant. " * 40
    assert prefix_key(generate_pb2.GenerateRequest(prompt=long_prompt + "Q1")) == long_prompt[:PREFIX_KEY_CHARS]
    assert prefix_key(generate_pb2.GenerateRequest(prompt=long_prompt + "Q2")) == long_prompt[:PREFIX_KEY_CHARS]
    assert prefix_key(generate_pb2.GenerateRequest(prompt="")) is None

    def chat(*turns: tuple[str, str]) -> generate_pb2.GenerateRequest:
        return generate_pb2.GenerateRequest(
            chat=generate_pb2.ChatInput(messages=[generate_pb2.ChatMessage(role=r, content=c) for r, c in turns])
        )

    # A conversation keeps its key over its turns; another opening is another key.
    first = prefix_key(chat(("system", "Be brief."), ("user", "Hi")))
    later = prefix_key(chat(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "More")))
    assert later == first
    assert first != prefix_key(chat(("system", "Be brief."), ("user", "Hello")))
    assert first != prefix_key(chat(("user", "Be brief."), ("user", "Hi")))


def assert_picks(router: Router, model: str, count: int) -> None:
    assert len({router.route(model) for _ in range(count * 2)}) == count


@pytest.mark.parametrize(
    "replicas, state, reason",
    [
        ({"gone": None}, "active", "agent gone is not registered"),
        ({"a1": "10.0.0.1:1"}, "loading", "engine on agent a1 is loading"),
        ({"a1": "10.0.0.1:1"}, "failed", "engine on agent a1 is failed"),
    ],
)
async def test_replicas_that_cannot_serve_are_skipped(router, etcd, replicas, state, reason):
    await place(etcd, "m", replicas, state=state)
    await eventually(lambda: assert_unavailable(router, "m", reason))


def assert_unavailable(router: Router, model: str, reason: str) -> None:
    """Each prefix has a watch of its own, so the records may arrive in any order."""
    try:
        router.route(model)
    except ModelUnavailable as exc:
        assert reason in exc.message
        return
    raise AssertionError(f"{model} was routed")


async def test_inactive_engines_are_servable(router, etcd):
    await place(etcd, "m", {"a1": "10.0.0.1:1"}, state="inactive")
    await eventually(lambda: assert_picks(router, "m", 1))


async def test_a_vanished_agent_stops_being_routed_to(router, etcd):
    await place(etcd, "m", {"a1": "10.0.0.1:1", "a2": "10.0.0.2:1"})
    await eventually(lambda: assert_picks(router, "m", 2))
    await etcd.delete((records.AGENTS + "a2").encode())
    await eventually(lambda: assert_picks(router, "m", 1))
    assert router.route("m") == "10.0.0.1:1"


async def test_list_models(router, etcd):
    await place(etcd, "live", {"a1": "10.0.0.1:1"}, max_context=2048)
    await place(etcd, "loading", {"a2": "10.0.0.2:1"}, state="loading", max_context=0)
    await put(etcd, records.MODELS + "unplaced", records.ModelRecord(name="unplaced", path="/m").to_json())

    def check() -> None:
        models = {m.name: (m.available, m.max_context) for m in router.list_models()}
        assert models == {"live": (True, 2048), "loading": (False, 0), "unplaced": (False, 0)}

    await eventually(check)


async def test_unreadable_records_are_ignored(router, etcd):
    await place(etcd, "m", {"a1": "10.0.0.1:1"})
    await put(etcd, records.AGENTS + "a1", b"{not json")
    await eventually(lambda: assert_unavailable(router, "m", "agent a1 is not registered"))


async def test_channels_of_vanished_agents_are_closed(router, etcd):
    await place(etcd, "m", {"a1": "127.0.0.1:1", "a2": "127.0.0.1:2"})
    await eventually(lambda: assert_picks(router, "m", 2))
    first = router.stub("127.0.0.1:1")
    assert router.stub("127.0.0.1:1") is first  # one channel per address
    router.stub("127.0.0.1:2")
    await etcd.delete((records.AGENTS + "a1").encode())

    def check() -> None:
        assert router.channel_addresses() == {"127.0.0.1:2"}

    await eventually(check)
    assert router.stub("127.0.0.1:1") is not first
