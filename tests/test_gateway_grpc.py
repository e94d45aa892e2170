"""The gateway's gRPC API (prism.v1.Gateway) through the raw generated stub,
against the same engine-less stack as the REST tests: real etcd, the
gateway subprocess and a scripted fake agent."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from test_gateway_support import (  # its fixtures come as a plugin (tests/conftest.py)
    # noqa: F401 - fixtures,
    GatewayStack,
)

from prism_client.v1 import gateway_pb2, gateway_pb2_grpc, generate_pb2
from services.common.etcd_server import free_port


@pytest.fixture(scope="module")
def channel(gateway_stack: GatewayStack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(gateway_stack.grpc_target) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> gateway_pb2_grpc.GatewayStub:
    return gateway_pb2_grpc.GatewayStub(channel)


def prompt_request(model: str, prompt: str, request_id: str = "", **sampling) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        request_id=request_id, model=model, prompt=prompt, sampling=generate_pb2.SamplingParams(**sampling)
    )


def metadata_value(pairs, key: str) -> str | None:
    return next((v for k, v in pairs or () if k == key), None)


def test_list_models(stub, gateway_stack, fake_agent):
    gateway_stack.serve_model("grpc-listed", [fake_agent], max_context=77)
    models = {m.name: m for m in stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=5).models}
    assert models["grpc-listed"] == gateway_pb2.ModelInfo(name="grpc-listed", available=True, max_context=77)


def test_generate_relays_the_agent_stream(stub, fake_agent, echo_model):
    call = stub.Generate(prompt_request(echo_model, "echo a b c", max_tokens=10), timeout=5)
    responses = list(call)
    request_id = responses[0].request_id
    assert request_id.startswith("cmpl-") and all(r.request_id == request_id for r in responses)
    assert [r.text for r in responses] == ["a ", "b ", "c "]
    assert [list(r.token_ids) for r in responses] == [[0], [1], [2]]
    assert [r.finish_reason for r in responses] == [0, 0, generate_pb2.FINISH_REASON_STOP]
    assert (responses[-1].usage.prompt_tokens, responses[-1].usage.completion_tokens) == (4, 3)
    assert metadata_value(call.initial_metadata(), "x-request-id") == request_id
    agent_call = fake_agent.call_for(request_id)
    assert agent_call.request.sampling.max_tokens == 10
    assert agent_call.metadata["x-request-id"] == request_id


def test_chat_and_the_callers_request_id_are_kept(stub, fake_agent, echo_model):
    request = generate_pb2.GenerateRequest(
        request_id="grpc-caller-1",
        model=echo_model,
        chat=generate_pb2.ChatInput(messages=[generate_pb2.ChatMessage(role="user", content="echo x y")]),
    )
    responses = list(stub.Generate(request, timeout=5))
    assert "".join(r.text for r in responses) == "x y "
    assert {r.request_id for r in responses} == {"grpc-caller-1"}
    forwarded = fake_agent.call_for("grpc-caller-1").request
    assert forwarded.WhichOneof("input") == "chat" and forwarded.chat.messages[0].content == "echo x y"
    assert not forwarded.sampling.HasField("max_tokens")  # chat: the engine's default


def test_unknown_model_is_not_found_with_the_request_id(stub):
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(prompt_request("no-such-model", "hi", request_id="grpc-404"), timeout=5))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no-such-model" in caught.value.details()
    assert metadata_value(caught.value.trailing_metadata(), "x-request-id") == "grpc-404"


@pytest.mark.parametrize(
    "request_fields",
    [
        dict(sampling=dict(max_tokens=0)),
        dict(sampling=dict(max_tokens=-5)),
        dict(sampling=dict(temperature=-1.0)),
        dict(sampling=dict(temperature=2.5)),
        dict(sampling=dict(temperature=float("nan"))),
        dict(sampling=dict(top_p=0.0)),
        dict(sampling=dict(top_p=1.5)),
        dict(prompt=""),
        dict(prompt=None),
        dict(chat=dict(messages=[])),
        dict(chat=dict(messages=[dict(role="robot", content="hi")])),
        dict(model=""),
    ],
    ids=repr,
)
def test_invalid_requests_are_invalid_argument(stub, fake_agent, echo_model, request_fields):
    fields = {
        "model": echo_model,
        "prompt": "echo hi",
        "request_id": f"grpc-invalid-{time.monotonic_ns()}",
        **request_fields,
    }
    sampling = fields.pop("sampling", {})
    if "chat" in fields:
        fields.pop("prompt")
        fields["chat"] = generate_pb2.ChatInput(
            messages=[generate_pb2.ChatMessage(**m) for m in fields["chat"]["messages"]]
        )
    elif fields["prompt"] is None:
        fields.pop("prompt")
    request = generate_pb2.GenerateRequest(sampling=generate_pb2.SamplingParams(**sampling), **fields)
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(request, timeout=5))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert not fake_agent.received(request.request_id)


def test_dead_agent_is_unavailable_at_once(stub, gateway_stack):
    gateway_stack.serve_model("grpc-dead", {"grpc-dead-agent": f"127.0.0.1:{free_port()}"})
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Generate(prompt_request("grpc-dead", "hi"), timeout=10))
    assert time.monotonic() - start < 1.5
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no live replica" in caught.value.details()


@pytest.mark.parametrize(
    "code", ["INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL"]
)
def test_agent_errors_keep_their_codes(stub, echo_model, code):
    with pytest.raises(grpc.RpcError) as caught:
        list(
            stub.Generate(
                prompt_request(echo_model, f"fail {code} detail-{code}", request_id=f"grpc-{code}"), timeout=5
            )
        )
    # But an agent's NOT_FOUND: a replica that no longer has the model (it exists: the gateway knows it),
    # so with no other replica, UNAVAILABLE.
    assert caught.value.code() == grpc.StatusCode["UNAVAILABLE" if code == "NOT_FOUND" else code]
    if code in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"):
        assert f"detail-{code}" in caught.value.details()
    if code == "INTERNAL":
        assert f"grpc-{code}" in caught.value.details()


def test_an_error_after_output_ends_the_stream_with_its_code(stub, echo_model):
    received = []
    with pytest.raises(grpc.RpcError) as caught:
        for response in stub.Generate(prompt_request(echo_model, "fail-after 2 RESOURCE_EXHAUSTED"), timeout=5):
            received.append(response.text)
    assert received == ["t ", "t "]
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_cancelling_the_call_cancels_the_agent_call(stub, fake_agent, echo_model):
    call = stub.Generate(prompt_request(echo_model, "slow 60", request_id="grpc-cancel"), timeout=10)
    next(call)
    call.cancel()
    agent_call = fake_agent.call_for("grpc-cancel")
    assert agent_call.ended.wait(2) and agent_call.cancelled


def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "prism.v1.Gateway"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"prism.v1.Gateway", "grpc.health.v1.Health"} <= names


def test_rest_and_grpc_share_the_metrics(stub, gateway_stack, echo_model):
    list(stub.Generate(prompt_request(echo_model, "echo m"), timeout=5))
    text = httpx.get(gateway_stack.http_url + "/metrics").text
    assert f'prism_gateway_requests_total{{api="grpc",code="200",model="{echo_model}"}}' in text
