"""SIGTERM drains (issue 8, item 6c).

The gateway (a real gateway process over a real etcd, with a scripted fake
agent whose streams take as long as the test needs: test_gateway_support.py):
on SIGTERM it stops taking requests (REST 503, /health 503; gRPC
UNAVAILABLE), lets those in flight finish, ends the ones still going at the
end of its grace (SHUTDOWN_GRACE_S) with an explicit error (an SSE error
event and [DONE], a 503, UNAVAILABLE with the gateway's trailers) instead of
cutting them, and exits 0.

An agent (its gRPC service over a real engine of a tiny model, in this
process; then a real two-agent cluster): on SIGTERM it sends new Generate
calls and the requests waiting in its admission queue back unstarted
(UNAVAILABLE with the draining marker: the gateway routes them again),
refuses LoadModel, lets its running requests finish within its grace and
ends those left with UNAVAILABLE saying it shut down; in the cluster, with
the model on both agents, no request fails and the agent exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter

import grpc
import httpx
import pytest
from in_process_agent import InProcessAgent
from test_gateway_support import (
    EtcdWriter,
    FakeAgent,
    start_gateway,
    stop_process,
    wait_until_healthy,
)

from bench.load_soak import (
    CANCELLED,
    COMPLETE,
    ERROR,
    MODELS,
    BackgroundLoad,
    Clients,
    Planned,
    agent_accounting,
    load_cluster,
    send,
)
from prism.tiny_models import write_tiny_model
from prism_client.v1 import agent_pb2, gateway_pb2_grpc, generate_pb2
from services.common.grpc_util import DRAINING_KEY
from services.gateway.server import SHUTDOWN_GRACE_S
from services.gpu_agent.server import drain_for_shutdown

GUARD_S = 60  # a request or a process not done by then has hung
SHORT = 40  # the fake agent's "slow N" streams N tokens 30 ms apart: 1.2 s, well within the grace
LONG = 1000  # 30 s: past the grace


def fake(index: int, api: str, tokens: int, stream: bool = True, prompt: str | None = None) -> Planned:
    return Planned(
        index=index,
        api=api,
        model="fake",
        prompt=prompt or f"slow {tokens}",
        max_tokens=tokens,
        stream=stream,
        chat=False,
        cancel_after=0,
    )


@pytest.fixture()
def fake_agent():
    agent = FakeAgent()
    yield agent
    agent.stop()


@pytest.fixture()
def gateway(etcd_server, fake_agent, tmp_path):
    EtcdWriter(etcd_server.endpoint).serve_model("fake", {"fake-agent": fake_agent.address})
    log_path = tmp_path / "gateway.log"
    process, http_url, grpc_target = start_gateway(etcd_server.endpoint, log_path)
    try:
        wait_until_healthy(http_url, process, log_path)
        deadline = time.monotonic() + GUARD_S
        while not any(m["id"] == "fake" and m["available"] for m in httpx.get(http_url + "/v1/models").json()["data"]):
            assert time.monotonic() < deadline, "the gateway never listed the fake model"
            time.sleep(0.05)
        yield process, http_url, grpc_target, log_path
    finally:
        stop_process(process)


async def _refused_during_the_drain(
    http_url: str, grpc_target: str
) -> tuple[httpx.Response, httpx.Response, grpc.aio.AioRpcError]:
    """/health and a new completion (on a new connection), and a new gRPC call (on a new channel)."""
    async with httpx.AsyncClient(base_url=http_url, timeout=10) as http:
        deadline = time.monotonic() + GUARD_S
        while (health := await http.get("/health")).status_code == 200:  # the signal has been handled
            assert time.monotonic() < deadline, "still healthy after SIGTERM"
            await asyncio.sleep(0.02)
        completion = await http.post(
            "/v1/completions", json={"model": "fake", "prompt": f"slow {SHORT}", "max_tokens": SHORT}
        )
    async with grpc.aio.insecure_channel(grpc_target) as channel:
        call = gateway_pb2_grpc.GatewayStub(channel).Generate(
            generate_pb2.GenerateRequest(
                model="fake", prompt=f"slow {SHORT}", sampling=generate_pb2.SamplingParams(max_tokens=SHORT)
            ),
            timeout=10,
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in call:
                pass
    return health, completion, refused.value


def test_sigterm_drains_the_gateway_and_ends_what_outlasts_its_grace_explicitly(gateway, fake_agent):
    process, http_url, grpc_target, log_path = gateway
    short = [fake(0, "rest", SHORT), fake(1, "rest", SHORT, stream=False), fake(2, "grpc", SHORT)]
    long = [
        fake(3, "rest", LONG),
        fake(4, "rest", LONG, stream=False),
        fake(5, "grpc", LONG),
        # still waiting for the agent's first response ("hang": none comes)
        fake(6, "rest", LONG, prompt="hang"),
        fake(7, "grpc", LONG, prompt="hang"),
    ]

    async def scenario():
        clients = Clients(http_url, grpc_target, concurrency=8)
        try:
            in_flight = [asyncio.create_task(send(clients, p, GUARD_S)) for p in short + long]
            deadline = time.monotonic() + GUARD_S
            while len(fake_agent.calls) < len(in_flight):  # every one is streaming from the agent
                assert time.monotonic() < deadline, "the requests did not reach the agent"
                await asyncio.sleep(0.01)
            signalled = time.monotonic()
            process.send_signal(signal.SIGTERM)
            refused = await _refused_during_the_drain(http_url, grpc_target)
            outcomes = await asyncio.gather(*in_flight)
            code = await asyncio.to_thread(process.wait, GUARD_S)
            return signalled, refused, outcomes, code, time.monotonic()
        finally:
            await clients.close()

    signalled, (health, completion, grpc_refused), outcomes, code, exited = asyncio.run(scenario())
    print(
        f"\ngateway exited {code} {exited - signalled:.2f}s after SIGTERM (grace {SHUTDOWN_GRACE_S:g}s); "
        f"in flight: {[(o.shape, o.label, round(o.ended - signalled, 2)) for o in outcomes]}"
    )
    # New requests during the drain: refused, explicitly.
    assert health.status_code == 503
    assert completion.status_code == 503, completion.text
    assert completion.json()["error"]["code"] == "gateway_shutting_down" and completion.headers["retry-after"] == "1"
    assert grpc_refused.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in grpc_refused.details()
    assert dict(grpc_refused.trailing_metadata())["x-request-id"].startswith("cmpl-")
    # In flight: the short ones finish whole, the ones that outlast the grace end with an explicit error.
    assert [o.kind for o in outcomes[:3]] == [COMPLETE] * 3, [o.label for o in outcomes[:3]]
    assert [o.label for o in outcomes[3:]] == [
        "error sse gateway_shutting_down",
        "error http 503",
        "error grpc UNAVAILABLE",
        "error http 503",
        "error grpc UNAVAILABLE",
    ], [o.label for o in outcomes[3:]]
    assert CANCELLED not in {o.kind for o in outcomes} and all(o.kind in (COMPLETE, ERROR) for o in outcomes)
    # ... and their agent calls were cancelled, not left running.
    ended = [call for call in fake_agent.calls if call.request.prompt in (f"slow {LONG}", "hang")]
    assert len(ended) == len(long) and all(call.ended.wait(10) and call.cancelled for call in ended)
    assert code == 0, log_path.read_text()
    assert "gateway stopped" in log_path.read_text()


# ---- the agent --------------------------------------------------------------------------------


class LoadedAgent(InProcessAgent):
    """The agent's gRPC service as its server wires it (in_process_agent.py), model "m" loaded."""

    def __init__(self, model_path: str):
        super().__init__()
        self.model_path = model_path

    async def __aenter__(self) -> LoadedAgent:
        await self.start()
        status = await self.stub.LoadModel(self.load_request(), timeout=120)
        assert status.state == agent_pb2.ENGINE_STATE_ACTIVE, status
        return self

    def load_request(self) -> agent_pb2.LoadModelRequest:
        return agent_pb2.LoadModelRequest(
            spec=agent_pb2.ModelSpec(name="m", path=self.model_path), gpu_ids=[0], activate=True
        )

    def generate(self, i: int, max_tokens: int, prompt: str = "Hello"):
        return self.stub.Generate(
            generate_pb2.GenerateRequest(
                request_id=f"r{i}",
                model="m",
                prompt=prompt,
                sampling=generate_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
            ),
            timeout=GUARD_S,
        )


async def _ending(call) -> tuple[int, grpc.aio.AioRpcError | None]:
    """(tokens it streamed, the error it ended with or None)."""
    tokens = 0
    try:
        while (response := await call.read()) is not grpc.aio.EOF:
            tokens += len(response.token_ids)
    except grpc.aio.AioRpcError as exc:
        return tokens, exc
    return tokens, None


def _sent_back(exc: grpc.aio.AioRpcError | None) -> bool:
    return (
        exc is not None
        and exc.code() == grpc.StatusCode.UNAVAILABLE
        and (DRAINING_KEY, "1") in tuple(exc.trailing_metadata() or ())
    )


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> str:
    return str(write_tiny_model(tmp_path_factory.mktemp("sigterm-agent") / "m", arch="llama"))


async def test_an_agent_shutting_down_sends_back_what_it_has_not_started_and_finishes_the_rest(model_path):
    async with LoadedAgent(model_path) as agent:
        engine = agent.manager.engines["m"].engine
        agent.coordinator.kv_budget_cap_bytes = engine.kv_bundle_bytes  # room for about three of the prompts
        await agent.coordinator.rebalance()
        calls = [agent.generate(i, 100, prompt="hello " * 90) for i in range(8)]
        ends = [asyncio.create_task(_ending(call)) for call in calls]
        deadline = time.monotonic() + GUARD_S
        while not agent.admission.queued("m"):
            assert time.monotonic() < deadline, "no request waited in the admission queue"
            await asyncio.sleep(0.005)
        draining = asyncio.create_task(drain_for_shutdown(agent.manager, agent.admission, agent.gate, GUARD_S))
        # New calls during the drain: Generate sent back unstarted, LoadModel refused.
        tokens, refused = await _ending(agent.generate(99, 10))
        assert tokens == 0 and _sent_back(refused) and "shutting down" in refused.details(), refused
        with pytest.raises(grpc.aio.AioRpcError) as load:
            await agent.stub.LoadModel(agent.load_request(), timeout=10)
        assert load.value.code() == grpc.StatusCode.UNAVAILABLE
        # Those in flight: the running ones finish whole, the waiting ones come back unstarted at once.
        ended = await asyncio.gather(*ends)
        finished = [tokens for tokens, error in ended if error is None]
        sent_back = [(tokens, error) for tokens, error in ended if error is not None]
        assert finished and finished == [100] * len(finished), ended
        assert sent_back and all(tokens == 0 and _sent_back(error) for tokens, error in sent_back), sent_back
        await asyncio.wait_for(draining, GUARD_S)
        assert agent.manager.engines == {}


async def test_an_agent_whose_grace_ends_first_ends_its_requests_with_an_explicit_error(model_path):
    # A grace of 0 ends the drain at once, with the stream still in flight (see test_drain.py).
    async with LoadedAgent(model_path) as agent:
        call = agent.generate(0, 250)
        first = await call.read()
        await asyncio.wait_for(drain_for_shutdown(agent.manager, agent.admission, agent.gate, 0), GUARD_S)
        tokens, error = await _ending(call)
        tokens += len(first.token_ids)
        assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE and not _sent_back(error)
        assert "agent agent-t is shutting down and its grace of 0s passed" in error.details()
        assert "r0" in error.details() and tokens > 0
        assert agent.manager.engines == {}


def cluster_request(index: int) -> Planned:
    """Streams of 64 tokens (REST SSE and gRPC) and non-streamed REST completions, both models."""
    api, stream = [("rest", True), ("grpc", True), ("rest", False)][index % 3]
    return Planned(
        index=index,
        api=api,
        model=MODELS[index // 3 % 2],
        prompt=f"Request number {index}",
        max_tokens=64,
        stream=stream,
        chat=False,
        cancel_after=0,
    )


@pytest.fixture(scope="module")
def two_agents(tmp_path_factory):
    # A KV budget of a few requests' worth, so that requests wait in the admission queues: one
    # 512-token page bundle per engine, about 7 of cluster_request's 72-token requests.
    cluster = load_cluster(tmp_path_factory.mktemp("sigterm-agents"), agents=2, agent_args=("--kv-budget-gb", "0.0005"))
    cluster.start()
    yield cluster
    cluster.stop()


def test_sigterm_drains_an_agent_its_requests_finish_and_new_ones_go_to_the_other_replica(two_agents):
    cluster = two_agents
    # 36 workers: about 9 requests per engine (2 agents, 2 models), more than the 7 that fit, so both of
    # agent-2's engines have some waiting (24 left it to chance, and an even spread had none waiting).
    with BackgroundLoad(
        cluster.http_url, cluster.gateway_grpc, cluster_request, workers=36, deadline_s=GUARD_S
    ) as load:
        load.wait_for(lambda done: sum(o.kind == COMPLETE for o in done) >= 30, "requests before", GUARD_S)
        deadline = time.monotonic() + GUARD_S
        while True:  # requests running on agent-2, and more waiting in its admission queue
            busy = agent_accounting({"agent-2": cluster.agent_addresses["agent-2"]})["agent-2"]
            if all(n["running_requests"] and n["admission_queued"] for n in busy.values()):
                break
            assert time.monotonic() < deadline, f"agent-2 never had requests running and waiting: {busy}"
        victim = cluster.processes["agent-2"]
        signalled = time.monotonic()
        victim.send_signal(signal.SIGTERM)
        code = victim.wait(GUARD_S)
        exited = time.monotonic()
        load.wait_for(
            lambda done: sum(o.kind == COMPLETE and o.started > exited for o in done) >= 30, "requests after", GUARD_S
        )
    outcomes = load.outcomes
    around = [o for o in outcomes if o.started < exited and o.ended > signalled]
    print(
        f"\nagent-2 exited {code} {exited - signalled:.2f}s after SIGTERM; {len(outcomes)} requests, "
        f"{len(around)} in flight around it: {dict(Counter(o.label for o in outcomes))}"
    )
    log = (cluster.log_dir / "agent-2.log").read_text(errors="replace")
    print("\n".join(line for line in log.splitlines() if "drain" in line or "sent back" in line or "stopping" in line))
    assert code == 0, cluster.log_tail("agent-2")
    assert {o.label for o in outcomes} == {"complete"}, dict(Counter(o.label for o in outcomes))
    assert "drained in" in log
