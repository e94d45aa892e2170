"""Bad input over gRPC, sent to the real gateway's prism.v1.Gateway and
straight to the agent's prism.v1.Agent on the session's real local cluster
(conftest's `cluster`): every call ends within its deadline, with OK or a
code the client's own input earns (ALLOWED), never UNKNOWN or INTERNAL."""

from __future__ import annotations

import math

import grpc
import pytest

from prism.v1 import agent_pb2_grpc, gateway_pb2_grpc, generate_pb2

MODELS = ("tiny-llama", "tiny-qwen2")
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
DEADLINE_S = 60.0  # per call: far beyond any answer here, so reaching it is a hang
GATEWAY_GENERATE = "/prism.v1.Gateway/Generate"
AGENT_GENERATE = "/prism.v1.Agent/Generate"


@pytest.fixture(scope="module")
def gateway_channel(cluster):
    with grpc.insecure_channel(cluster.gateway_grpc) as channel:
        yield channel


@pytest.fixture(scope="module")
def agent_channel(cluster):
    with grpc.insecure_channel(cluster.agent_address) as channel:
        yield channel


def outcome(call) -> tuple[grpc.StatusCode, list[generate_pb2.GenerateResponse]]:
    """The call's status and what it streamed; a disallowed code fails the test with its details."""
    responses: list[generate_pb2.GenerateResponse] = []
    try:
        responses.extend(call)  # keeps what came before an error
    except grpc.RpcError as error:
        assert error.code() in ALLOWED, f"{error.code()}: {error.details()}"
        assert error.details(), error.code()
        return error.code(), responses
    assert responses, "OK without any response"
    last = responses[-1]
    assert last.finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED, responses
    assert all(r.finish_reason == generate_pb2.FINISH_REASON_UNSPECIFIED for r in responses[:-1]), responses
    assert last.usage.prompt_tokens > 0 and last.usage.completion_tokens >= 0, last
    return grpc.StatusCode.OK, responses


def call_gateway(channel: grpc.Channel, request: generate_pb2.GenerateRequest):
    return outcome(gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=DEADLINE_S))


def call_agent(channel: grpc.Channel, request: generate_pb2.GenerateRequest):
    return outcome(agent_pb2_grpc.AgentStub(channel).Generate(request, timeout=DEADLINE_S))


# ---- regressions --------------------------------------------------------------------------------


def greedy_request(model: str, **sampling) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(model=model, prompt="The capital of France is",
                                        sampling=generate_pb2.SamplingParams(max_tokens=4, ignore_eos=True, **sampling))


@pytest.mark.parametrize("temperature", [1e-45, 1e-40, 1e-6])
def test_a_tiny_temperature_decodes_greedily(gateway_channel, agent_channel, temperature):
    """Logits divided by 1e-45 overflowed to inf and the softmax to NaN: the agent answered INTERNAL
    ("probability tensor contains either `inf`, `nan` or element < 0"), the gateway 500, and every
    other request in the same engine step failed with it. Below 1e-5 it is greedy decoding now."""
    for channel, call in ((gateway_channel, call_gateway), (agent_channel, call_agent)):
        code, greedy = call(channel, greedy_request(MODELS[0], temperature=0.0))
        code_tiny, tiny = call(channel, greedy_request(MODELS[0], temperature=temperature))
        assert code == code_tiny == grpc.StatusCode.OK
        assert [r.token_ids for r in tiny] == [r.token_ids for r in greedy]


@pytest.mark.parametrize("temperature", [math.nan, math.inf])
def test_the_agent_refuses_a_temperature_that_is_not_finite(agent_channel, temperature):
    """NaN passed the engine's `temperature < 0` check and failed the step (INTERNAL); inf sampled
    from a flat distribution. Both are INVALID_ARGUMENT (the gateway refuses them itself)."""
    with pytest.raises(grpc.RpcError) as caught:
        list(agent_pb2_grpc.AgentStub(agent_channel).Generate(greedy_request(MODELS[0], temperature=temperature),
                                                               timeout=DEADLINE_S))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "temperature" in caught.value.details()


def test_a_tiny_temperature_row_samples_beside_others():
    """The step samples every row of a batch at once: a row at temperature 1e-45 takes its argmax and
    the rows beside it still sample (the whole step used to fail)."""
    import torch

    from services.gpu_agent.engine.sampling import SamplingParams, sample_batch

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 10
    params = [SamplingParams(temperature=1e-45), SamplingParams(temperature=1.0, seed=1), SamplingParams(0.0)]
    generators = [None, torch.Generator().manual_seed(1), None]
    tokens = sample_batch(logits, params, generators)
    assert tokens[0] == int(logits[0].argmax()) and tokens[2] == int(logits[2].argmax())
    assert 0 <= tokens[1] < 50


CORRUPT = b"\xff\xff\xff"  # no message's wire format
UNDECODABLE = [
    (GATEWAY_GENERATE, CORRUPT), (GATEWAY_GENERATE, b"\x12\x02\xff\xfe"),  # model: not UTF-8
    (GATEWAY_GENERATE, b"\x12\x0atiny-llama\x1a\x02\xc3\x28"),  # prompt: not UTF-8
    (AGENT_GENERATE, CORRUPT), (AGENT_GENERATE, b"\x12\x0atiny-llama\x1a\x02\xc3\x28"),
    ("/prism.v1.Gateway/ListModels", CORRUPT), ("/prism.v1.Agent/GetStatus", CORRUPT),
    ("/prism.v1.Agent/UnloadModel", b"\x0a\x02\xff\xfe"),  # model: not UTF-8
]


@pytest.mark.parametrize("method, data", UNDECODABLE)
def test_a_request_that_does_not_parse_is_invalid_argument(gateway_channel, agent_channel, method, data):
    """gRPC's server parses the request before the servicer runs; a DecodeError there was UNKNOWN
    ("Unexpected <class 'google.protobuf.message.DecodeError'>: ... Wire format was corrupt" or
    "String field had bad UTF-8"). Both services answer INVALID_ARGUMENT now."""
    channel = gateway_channel if method.startswith("/prism.v1.Gateway/") else agent_channel
    call = (channel.unary_stream if method.endswith("/Generate") else channel.unary_unary)(
        method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as caught:
        reply = call(data, timeout=DEADLINE_S)
        if method.endswith("/Generate"):
            list(reply)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert "does not parse" in caught.value.details()


async def test_the_guard_passes_a_close_on_to_the_servicer():
    """grpc.aio closes a servicer's stream at its yield when the client cancels as it sends; through
    the guard the servicer's own generator must be closed too, so its cleanup runs."""
    from services.common.grpc_decode import _guarded

    closed = []

    async def generate(request, context):
        try:
            yield 1
            yield 2
        finally:
            closed.append(request.model)

    handler = _guarded(grpc.unary_stream_rpc_method_handler(
        generate, request_deserializer=generate_pb2.GenerateRequest.FromString))
    stream = handler.unary_stream(handler.request_deserializer(generate_pb2.GenerateRequest(model="m").SerializeToString()),
                                  None)
    assert await stream.__anext__() == 1
    await stream.aclose()
    assert closed == ["m"]
