"""SIGTERM drains (issue 8, item 6c), on real processes.

The gateway (a real gateway process over a real etcd, with a scripted fake
agent whose streams take as long as the test needs: test_gateway_support.py):
on SIGTERM it stops taking requests (REST 503, /health 503; gRPC
UNAVAILABLE), lets those in flight finish, ends the ones still going at the
end of its grace (SHUTDOWN_GRACE_S) with an explicit error (an SSE error
event and [DONE], a 503, UNAVAILABLE with the gateway's trailers) instead of
cutting them, and exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import httpx
import pytest
from test_gateway_support import EtcdWriter, FakeAgent, start_gateway, stop_process, wait_until_healthy

from bench.load_soak import CANCELLED, COMPLETE, ERROR, Clients, Planned, send
from prism.v1 import gateway_pb2_grpc, generate_pb2
from services.gateway.server import SHUTDOWN_GRACE_S

GUARD_S = 60  # a request or a process not done by then has hung
SHORT = 40  # the fake agent's "slow N" streams N tokens 30 ms apart: 1.2 s, well within the grace
LONG = 1000  # 30 s: past the grace


def fake(index: int, api: str, tokens: int, stream: bool = True, prompt: str | None = None) -> Planned:
    return Planned(index=index, api=api, model="fake", prompt=prompt or f"slow {tokens}", max_tokens=tokens,
                   stream=stream, chat=False, cancel_after=0)


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


async def _refused_during_the_drain(http_url: str, grpc_target: str) -> tuple[httpx.Response, httpx.Response,
                                                                                  grpc.aio.AioRpcError]:
    """/health and a new completion (on a new connection), and a new gRPC call (on a new channel)."""
    async with httpx.AsyncClient(base_url=http_url, timeout=10) as http:
        deadline = time.monotonic() + GUARD_S
        while (health := await http.get("/health")).status_code == 200:  # the signal has been handled
            assert time.monotonic() < deadline, "still healthy after SIGTERM"
            await asyncio.sleep(0.02)
        completion = await http.post("/v1/completions", json={"model": "fake", "prompt": f"slow {SHORT}",
                                                               "max_tokens": SHORT})
    async with grpc.aio.insecure_channel(grpc_target) as channel:
        call = gateway_pb2_grpc.GatewayStub(channel).Generate(generate_pb2.GenerateRequest(
            model="fake", prompt=f"slow {SHORT}", sampling=generate_pb2.SamplingParams(max_tokens=SHORT)), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in call:
                pass
    return health, completion, refused.value


def test_sigterm_drains_the_gateway_and_ends_what_outlasts_its_grace_explicitly(gateway, fake_agent):
    process, http_url, grpc_target, log_path = gateway
    short = [fake(0, "rest", SHORT), fake(1, "rest", SHORT, stream=False), fake(2, "grpc", SHORT)]
    long = [fake(3, "rest", LONG), fake(4, "rest", LONG, stream=False), fake(5, "grpc", LONG),
            # still waiting for the agent's first response ("hang": none comes)
            fake(6, "rest", LONG, prompt="hang"), fake(7, "grpc", LONG, prompt="hang")]

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
    print(f"\ngateway exited {code} {exited - signalled:.2f}s after SIGTERM (grace {SHUTDOWN_GRACE_S:g}s); "
          f"in flight: {[(o.shape, o.label, round(o.ended - signalled, 2)) for o in outcomes]}")
    # New requests during the drain: refused, explicitly.
    assert health.status_code == 503
    assert completion.status_code == 503, completion.text
    assert completion.json()["error"]["code"] == "gateway_shutting_down" and completion.headers["retry-after"] == "1"
    assert grpc_refused.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in grpc_refused.details()
    assert dict(grpc_refused.trailing_metadata())["x-request-id"].startswith("cmpl-")
    # In flight: the short ones finish whole, the ones that outlast the grace end with an explicit error.
    assert [o.kind for o in outcomes[:3]] == [COMPLETE] * 3, [o.label for o in outcomes[:3]]
    assert [o.label for o in outcomes[3:]] == ["error sse gateway_shutting_down", "error http 503",
                                               "error grpc UNAVAILABLE", "error http 503",
                                               "error grpc UNAVAILABLE"], [o.label for o in outcomes[3:]]
    assert CANCELLED not in {o.kind for o in outcomes} and all(o.kind in (COMPLETE, ERROR) for o in outcomes)
    # ... and their agent calls were cancelled, not left running.
    ended = [call for call in fake_agent.calls if call.request.prompt in (f"slow {LONG}", "hang")]
    assert len(ended) == len(long) and all(call.ended.wait(10) and call.cancelled for call in ended)
    assert code == 0, log_path.read_text()
    assert "gateway stopped" in log_path.read_text()
