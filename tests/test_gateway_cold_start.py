"""Cold start at the gateway (services/gateway/cold_start.py), on the
engine-less stack of the gateway tests (real etcd, the gateway as a
subprocess, a scripted fake agent; see test_gateway_support.py): a request
for a model that has no servable engine waits for one, its demand published
in etcd while it waits, and is served once the engine appears, with the wait
in its TTFT; a model that never comes fails with 503 after its bound; a
client that leaves stops waiting. The stack's gateway waits the model's TTFT
SLO plus COLD_START_S (0.5 s)."""

from __future__ import annotations

import json
import threading
import time

import grpc
import httpx
import pytest
from test_gateway_support import (  # its fixtures come as a plugin (tests/conftest.py)
    # noqa: F401 - fixtures,
    COLD_START_S,
    FakeAgent,
    GatewayStack,
)

from prism_client.v1 import gateway_pb2_grpc, generate_pb2
from services.common import records
from services.scheduler.server import waiting_at_gateways
from tests.prometheus_text import metric_values

GUARD_S = 15.0  # hang guard: far beyond any wait here
LONG_SLO_MS = 20_000  # a model that would wait 20.5 s: only its engine appearing (or the client leaving) ends it


def demand(stack: GatewayStack, model: str) -> list[records.DemandRecord]:
    return [records.DemandRecord.from_json(v) for v in stack.etcd.get_prefix(records.DEMAND + model + "/").values()]


def wait_for_demand(stack: GatewayStack, model: str, waiting: int) -> list[records.DemandRecord]:
    deadline = time.monotonic() + GUARD_S
    while True:
        found = demand(stack, model)
        if sum(r.waiting for r in found) == waiting:
            return found
        assert time.monotonic() < deadline, f"demand for {model} is {found}, waited for {waiting} waiting"
        time.sleep(0.02)


def metrics(stack: GatewayStack) -> dict[str, float]:
    return metric_values(httpx.get(stack.http_url + "/metrics", timeout=5).text)


class Background:
    """A blocking call run on a thread; result() waits for it."""

    def __init__(self, fn):
        self._value = self._error = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn) -> None:
        try:
            self._value = fn()
        except BaseException as exc:  # handed to the test
            self._error = exc

    def running(self) -> bool:
        return self._thread.is_alive()

    def result(self, timeout_s: float = GUARD_S):
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the call did not return"
        if self._error is not None:
            raise self._error
        return self._value


def register_unserved(stack: GatewayStack, model: str, how: str, agent: FakeAgent) -> None:
    """`model` in the registry with no servable engine: never placed, or placed with its engine loading."""
    if how == "unplaced":
        stack.etcd.put(
            records.MODELS + model, records.ModelRecord(name=model, path="/m", ttft_ms=LONG_SLO_MS).to_json()
        )
    else:
        stack.etcd.serve_model(model, {f"agent-{model}": agent.address}, state="loading", ttft_ms=LONG_SLO_MS)
    stack.wait_for_model(model, available=False)


@pytest.mark.parametrize("how", ["unplaced", "loading"])
def test_a_request_waits_for_its_engine_and_is_served(gateway_stack, fake_agent, how):
    model = f"cold-{how}"
    register_unserved(gateway_stack, model, how, fake_agent)
    assert demand(gateway_stack, model) == []
    started = time.time()
    request = Background(
        lambda: httpx.post(
            gateway_stack.http_url + "/v1/completions",
            timeout=GUARD_S,
            json={"model": model, "prompt": "echo warm now", "stream": True},
        )
    )
    (record,) = wait_for_demand(gateway_stack, model, waiting=1)
    seen = time.monotonic()
    assert record.model == model and started - 1 <= record.since <= time.time()
    assert metrics(gateway_stack)[f'prism_gateway_cold_start_waiting{{model="{model}"}}'] == 1
    # Still waiting, not failed, after the gateway answered a metrics scrape and an etcd read since: nothing
    # can serve it yet.
    assert request.running()
    assert sum(r.waiting for r in demand(gateway_stack, model)) == 1
    # The engine appears (a scheduler placed it, its agent loaded it): the same records they would write.
    flipped = time.monotonic()
    gateway_stack.etcd.serve_model(model, {f"agent-{model}": fake_agent.address}, ttft_ms=LONG_SLO_MS)
    response = request.result()
    assert response.status_code == 200, response.text
    assert "warm" in response.text and response.text.rstrip().endswith("data: [DONE]")
    wait_for_demand(gateway_stack, model, waiting=0)  # gone once nobody waits
    samples = metrics(gateway_stack)
    waited = samples[f'prism_gateway_cold_start_wait_seconds_sum{{model="{model}",outcome="served"}}']
    assert samples[f'prism_gateway_cold_start_wait_seconds_count{{model="{model}",outcome="served"}}'] == 1
    assert waited >= flipped - seen  # it arrived before `seen` and could be served only after `flipped`
    ttft = samples[f'prism_gateway_time_to_first_token_seconds_sum{{api="completions",model="{model}"}}']
    assert ttft >= waited  # TTFT counts from arrival: the wait is in it
    assert samples[f'prism_gateway_cold_start_waiting{{model="{model}"}}'] == 0


def test_grpc_requests_wait_too(gateway_stack, fake_agent):
    model = "cold-grpc"
    register_unserved(gateway_stack, model, "loading", fake_agent)
    with grpc.insecure_channel(gateway_stack.grpc_target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        request = Background(
            lambda: list(stub.Generate(generate_pb2.GenerateRequest(model=model, prompt="echo a b"), timeout=GUARD_S))
        )
        wait_for_demand(gateway_stack, model, waiting=1)
        gateway_stack.etcd.serve_model(model, {f"agent-{model}": fake_agent.address}, state="inactive")
        assert [r.text for r in request.result()] == ["a ", "b "]
    wait_for_demand(gateway_stack, model, waiting=0)


def test_a_model_that_never_comes_is_503_after_its_bound(gateway_stack, fake_agent):
    model = "cold-never"
    gateway_stack.serve_model(model, {"agent-never": fake_agent.address}, state="loading")  # default SLO: 1 s
    bound_s = 1.0 + COLD_START_S
    start = time.monotonic()
    requests = [
        Background(
            lambda: httpx.post(
                gateway_stack.http_url + "/v1/completions", timeout=GUARD_S, json={"model": model, "prompt": "echo hi"}
            )
        )
        for _ in range(3)
    ]

    def grpc_call() -> grpc.RpcError | None:
        with grpc.insecure_channel(gateway_stack.grpc_target) as channel:
            try:
                list(
                    gateway_pb2_grpc.GatewayStub(channel).Generate(
                        generate_pb2.GenerateRequest(model=model, prompt="echo hi"), timeout=GUARD_S
                    )
                )
            except grpc.RpcError as exc:
                return exc
        return None

    via_grpc = Background(grpc_call)
    wait_for_demand(gateway_stack, model, waiting=4)  # four waiting, in one record of this gateway
    for request in requests:
        response = request.result()
        assert time.monotonic() - start >= bound_s  # it waited the whole bound
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["type"] == "service_unavailable_error" and error["code"] == "model_unavailable"
        assert f"did not become available within {bound_s:g}s" in error["message"]
        assert "loading" in error["message"]  # and why
    error = via_grpc.result()
    assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE
    assert "did not become available" in error.details()
    wait_for_demand(gateway_stack, model, waiting=0)
    samples = metrics(gateway_stack)
    assert samples[f'prism_gateway_cold_start_wait_seconds_count{{model="{model}",outcome="timeout"}}'] == 4
    assert samples[f'prism_gateway_requests_total{{api="completions",code="503",model="{model}"}}'] == 3
    assert samples[f'prism_gateway_requests_total{{api="grpc",code="503",model="{model}"}}'] == 1


def test_a_client_that_leaves_stops_waiting(gateway_stack, fake_agent):
    model = "cold-left"
    register_unserved(gateway_stack, model, "loading", fake_agent)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway_stack.http_url + "/v1/completions", json={"model": model, "prompt": "echo hi"}, timeout=0.5)
    wait_for_demand(gateway_stack, model, waiting=0)  # long before its 20.5 s bound
    samples = metrics(gateway_stack)
    assert samples[f'prism_gateway_cold_start_wait_seconds_count{{model="{model}",outcome="cancelled"}}'] == 1
    assert f'prism_gateway_cold_start_wait_seconds_count{{model="{model}",outcome="timeout"}}' not in samples
    assert samples[f'prism_gateway_cold_start_waiting{{model="{model}"}}'] == 0


def test_unknown_models_do_not_wait(gateway_stack):
    response = httpx.post(
        gateway_stack.http_url + "/v1/completions",
        timeout=GUARD_S,
        json={"model": "cold-no-such-model", "prompt": "hi"},
    )
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert demand(gateway_stack, "cold-no-such-model") == []
    assert not any("cold-no-such-model" in name for name in metrics(gateway_stack))  # no wait began


def test_demand_records_are_json_the_scheduler_reads(gateway_stack, fake_agent):
    model = "cold-record"
    register_unserved(gateway_stack, model, "unplaced", fake_agent)
    request = Background(
        lambda: httpx.post(
            gateway_stack.http_url + "/v1/completions", timeout=GUARD_S, json={"model": model, "prompt": "echo x"}
        )
    )
    wait_for_demand(gateway_stack, model, waiting=1)
    ((key, raw),) = gateway_stack.etcd.get_prefix(records.DEMAND + model + "/").items()
    value = json.loads(raw)
    assert set(value) == {"model", "gateway_id", "waiting", "since"}
    assert key == records.demand_key(model, value["gateway_id"])
    assert waiting_at_gateways([raw]) == {model: 1}  # what the scheduler makes of it
    gateway_stack.etcd.serve_model(model, {f"agent-{model}": fake_agent.address})
    assert request.result().status_code == 200
