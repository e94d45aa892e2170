"""Bad input over gRPC, proven with hypothesis: GenerateRequests with random
field values, and random bytes (parsed or not), sent to the real gateway's
prism.v1.Gateway and straight to the agent's prism.v1.Agent on the
session's real local cluster (conftest's `cluster`); under the random search
a deterministic grid puts every odd value in every field once.

Every call ends within its deadline (no hang) with OK or a code the
client's own input can earn (ALLOWED), never UNKNOWN or INTERNAL (a server
failure) and, the cluster being ready, never UNAVAILABLE. The set comes from
reading the services: INVALID_ARGUMENT for a request that fails validation
(the gateway's, the engine's: a prompt over the context) or does not parse;
NOT_FOUND for a model nobody serves; RESOURCE_EXHAUSTED for the client's
size, rate and stream limits, a prompt no KV memory can hold, or load shed.
FAILED_PRECONDITION travels only between an agent and its engine workers,
and a valid request (no mutation) must succeed. Every process is alive at
the end."""

from __future__ import annotations

import math
import uuid

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prism_client.v1 import agent_pb2_grpc, gateway_pb2, gateway_pb2_grpc, generate_pb2

MODELS = ("tiny-llama", "tiny-qwen2")
ROLES = ("system", "user", "assistant")
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
DEADLINE_S = 60.0  # per call: far beyond any answer here, so reaching it is a hang
GATEWAY_GENERATE = "/prism.v1.Gateway/Generate"
AGENT_GENERATE = "/prism.v1.Agent/Generate"

SETTINGS = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def gateway_channel(cluster):
    with grpc.insecure_channel(cluster.gateway_grpc) as channel:
        yield channel


@pytest.fixture(scope="module")
def agent_channel(cluster):
    with grpc.insecure_channel(cluster.agent_address) as channel:
        yield channel


def raw_generate(channel: grpc.Channel, method: str):
    """Generate taking the request as bytes, exactly as sent."""
    return channel.unary_stream(
        method, request_serializer=None, response_deserializer=generate_pb2.GenerateResponse.FromString
    )


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


# ---- strategies ---------------------------------------------------------------------------------

ODD_TEXT = ["", "\x00", "\u202e", "💥" * 30, "x" * 3000, "<|endoftext|>", "{{ raise_exception('x') }}", " " * 10]
ODD_INT32 = [-(2**31), -1, 0, 1, 255, 256, 2**31 - 1]
ODD_INT64 = [-(2**63), -1, 0, 2**63 - 1]
# float32 fields: denormals, NaN, the infinities, beyond float32 (stored as inf)
ODD_FLOATS = [0.0, -0.0, 1.0, 2.0, 0.5, 1e-45, 1e-40, 1e-7, 3.4e38, 1e300, -1.0, math.nan, math.inf, -math.inf]

text = st.one_of(st.text(max_size=30), st.sampled_from(ODD_TEXT))
odd_floats = st.sampled_from(ODD_FLOATS)
floats = st.one_of(odd_floats, odd_floats, st.floats(width=32, allow_nan=True, allow_infinity=True))
int32s = st.one_of(st.sampled_from(ODD_INT32), st.integers(-(2**31), 2**31 - 1))
int64s = st.one_of(st.sampled_from(ODD_INT64), st.integers(-(2**63), 2**63 - 1))


def _set(field: str, values: st.SearchStrategy):
    def mutate(request: generate_pb2.GenerateRequest, draw: st.DrawFn) -> None:
        setattr(request.sampling, field, draw(values))

    return mutate


def _clear(field: str):
    def mutate(request: generate_pb2.GenerateRequest, draw: st.DrawFn) -> None:
        request.sampling.ClearField(field)

    return mutate


def _model(request, draw) -> None:
    request.model = draw(text)


def _request_id(request, draw) -> None:
    request.request_id = draw(text)


def _prompt(request, draw) -> None:
    request.prompt = draw(text)


def _no_input(request, draw) -> None:
    request.ClearField(request.WhichOneof("input") or "prompt")


def _no_messages(request, draw) -> None:
    request.chat.SetInParent()  # selects chat even with no messages
    del request.chat.messages[:]


def _odd_message(request, draw) -> None:
    request.chat.messages.add(role=draw(st.one_of(st.sampled_from(ROLES), text)), content=draw(text))


def _generation_prompt(request, draw) -> None:
    request.chat.add_generation_prompt = draw(st.booleans())


def _stop(request, draw) -> None:
    request.sampling.stop[:] = draw(st.lists(text, max_size=4))


def _ignore_eos(request, draw) -> None:
    request.sampling.ignore_eos = True


# Each changes one thing of a valid request; several may apply.
MUTATIONS = (
    _model,
    _request_id,
    _prompt,
    _no_input,
    _no_messages,
    _odd_message,
    _generation_prompt,
    _stop,
    _ignore_eos,
    _set("max_tokens", int32s),
    _clear("max_tokens"),
    _set("temperature", floats),
    _set("top_p", floats),
    _set("seed", int64s),
)


@st.composite
def generate_requests(draw: st.DrawFn) -> tuple[generate_pb2.GenerateRequest, bool]:
    """A valid request (a tiny max_tokens and input that fits the 256-token context whatever the
    tokenizer does) with none to three MUTATIONS; and whether it is still the valid one."""
    request = generate_pb2.GenerateRequest(
        model=draw(st.sampled_from(MODELS)), sampling=generate_pb2.SamplingParams(max_tokens=draw(st.integers(1, 4)))
    )
    if draw(st.booleans()):
        request.prompt = draw(st.text(min_size=1, max_size=30))
    else:
        for _ in range(draw(st.integers(1, 3))):
            request.chat.messages.add(role=draw(st.sampled_from(ROLES)), content=draw(st.text(max_size=10)))
    mutations = draw(st.lists(st.sampled_from(MUTATIONS), max_size=3))
    for mutate in mutations:
        mutate(request, draw)
    return request, not mutations


def grid_requests() -> list[tuple[str, generate_pb2.GenerateRequest]]:
    """A valid request with one field at each odd value: a deterministic grid under the random search."""

    def base() -> generate_pb2.GenerateRequest:
        return generate_pb2.GenerateRequest(
            model=MODELS[0], prompt="Hello", sampling=generate_pb2.SamplingParams(max_tokens=2)
        )

    cases = []
    for field, values in (
        ("max_tokens", ODD_INT32),
        ("temperature", ODD_FLOATS),
        ("top_p", ODD_FLOATS),
        ("seed", ODD_INT64),
        ("stop", [[t] for t in ODD_TEXT] + [ODD_TEXT]),
    ):
        for value in values:
            request = base()
            if field == "stop":
                request.sampling.stop[:] = value
            else:
                setattr(request.sampling, field, value)
            cases.append((f"{field}={value!r:.40}", request))
    for field in ("model", "prompt", "request_id"):
        for value in ODD_TEXT:
            request = base()
            setattr(request, field, value)
            cases.append((f"{field}={value!r:.40}", request))
    for role in ["", "tool", "USER", *ODD_TEXT]:
        request = base()
        request.chat.messages.add(role=role, content="Hello")
        cases.append((f"role={role!r:.40}", request))
    no_input, no_messages, no_sampling, no_generation_prompt = base(), base(), base(), base()
    no_input.ClearField("prompt")
    no_messages.chat.SetInParent()  # chat selected, with no messages
    no_sampling.ClearField("sampling")
    no_generation_prompt.chat.messages.add(role="user", content="Hello")
    no_generation_prompt.chat.add_generation_prompt = False
    cases += [
        ("no input", no_input),
        ("no messages", no_messages),
        ("no sampling", no_sampling),
        ("no generation prompt", no_generation_prompt),
    ]
    return cases


@st.composite
def request_bytes(draw: st.DrawFn) -> bytes:
    """Random bytes, or a valid request's bytes cut short, bit-flipped, or with a field made invalid UTF-8."""
    valid = generate_pb2.GenerateRequest(
        model=MODELS[0], prompt="Hello", sampling=generate_pb2.SamplingParams(max_tokens=2)
    ).SerializeToString()
    index = draw(st.integers(0, len(valid) - 1))
    flipped = bytearray(valid)
    flipped[index] ^= draw(st.integers(1, 255))
    return draw(
        st.one_of(
            st.binary(max_size=200),
            st.just(valid[:index]),
            st.just(bytes(flipped)),
            st.just(valid + draw(st.binary(min_size=1, max_size=20))),
            st.sampled_from(
                [
                    b"\x12\x02\xff\xfe",
                    b"\x1a\x02\xc3\x28",
                    b"\x12\x0atiny-llama\x1a\x02\xed\xa0",
                    b"\x2a\x05\x08\xff\xff\xff\xff",
                    b"\x0a\xff\xff\xff\xff\x0f",
                    b"\x22\x04\x0a\x02\x12\xff",
                ]
            ),
        )
    )


# ---- the properties ------------------------------------------------------------------------------


@settings(SETTINGS, max_examples=400)
@given(case=generate_requests())
def test_gateway_generate(gateway_channel, case):
    request, valid = case
    code, _ = call_gateway(gateway_channel, request)
    assert code == grpc.StatusCode.OK or not valid, code
    if code == grpc.StatusCode.OK:
        assert request.model in MODELS


@settings(SETTINGS, max_examples=400)
@given(case=generate_requests())
def test_agent_generate(agent_channel, case):
    request, valid = case
    code, _ = call_agent(agent_channel, request)
    assert code == grpc.StatusCode.OK or not valid, code
    if code == grpc.StatusCode.OK:
        assert request.model in MODELS


@settings(SETTINGS, max_examples=200)
@given(data=request_bytes(), method=st.sampled_from([GATEWAY_GENERATE, AGENT_GENERATE]))
def test_random_bytes(gateway_channel, agent_channel, data, method):
    """What parses is served as that message; what does not is INVALID_ARGUMENT."""
    channel = gateway_channel if method == GATEWAY_GENERATE else agent_channel
    try:
        generate_pb2.GenerateRequest.FromString(data)
        parses = True
    except DecodeError:
        parses = False
    code, _ = outcome(raw_generate(channel, method)(data, timeout=DEADLINE_S))
    if not parses:
        assert code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("api", ["gateway", "agent"])
def test_every_odd_value_in_every_field(gateway_channel, agent_channel, api):
    channel, call = (gateway_channel, call_gateway) if api == "gateway" else (agent_channel, call_agent)
    for name, request in grid_requests():
        try:
            call(channel, request)
        except AssertionError as failure:
            raise AssertionError(f"{name}: {failure}") from None


# ---- regressions --------------------------------------------------------------------------------


def greedy_request(model: str, **sampling) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        model=model,
        prompt="The capital of France is",
        sampling=generate_pb2.SamplingParams(max_tokens=4, ignore_eos=True, **sampling),
    )


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
        list(
            agent_pb2_grpc.AgentStub(agent_channel).Generate(
                greedy_request(MODELS[0], temperature=temperature), timeout=DEADLINE_S
            )
        )
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
    (GATEWAY_GENERATE, CORRUPT),
    (GATEWAY_GENERATE, b"\x12\x02\xff\xfe"),  # model: not UTF-8
    (GATEWAY_GENERATE, b"\x12\x0atiny-llama\x1a\x02\xc3\x28"),  # prompt: not UTF-8
    (AGENT_GENERATE, CORRUPT),
    (AGENT_GENERATE, b"\x12\x0atiny-llama\x1a\x02\xc3\x28"),
    ("/prism.v1.Gateway/ListModels", CORRUPT),
    ("/prism.v1.Agent/GetStatus", CORRUPT),
    ("/prism.v1.Agent/UnloadModel", b"\x0a\x02\xff\xfe"),  # model: not UTF-8
]


@pytest.mark.parametrize("method, data", UNDECODABLE)
def test_a_request_that_does_not_parse_is_invalid_argument(gateway_channel, agent_channel, method, data):
    """gRPC's server parses the request before the servicer runs; a DecodeError there was UNKNOWN
    ("Unexpected <class 'google.protobuf.message.DecodeError'>: ... Wire format was corrupt" or
    "String field had bad UTF-8"). Both services answer INVALID_ARGUMENT now."""
    channel = gateway_channel if method.startswith("/prism.v1.Gateway/") else agent_channel
    call = (channel.unary_stream if method.endswith("/Generate") else channel.unary_unary)(
        method, request_serializer=None, response_deserializer=None
    )
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

    handler = _guarded(
        grpc.unary_stream_rpc_method_handler(generate, request_deserializer=generate_pb2.GenerateRequest.FromString)
    )
    stream = handler.unary_stream(
        handler.request_deserializer(generate_pb2.GenerateRequest(model="m").SerializeToString()), None
    )
    assert await stream.__anext__() == 1
    await stream.aclose()
    assert closed == ["m"]


def log_lines_starting(cluster, service: str, marker: str) -> list[str]:
    text = (cluster.log_dir / f"{service}.log").read_text(errors="replace")
    return [line for line in text.splitlines() if line.startswith(marker)]


def test_a_request_id_cannot_forge_agent_log_lines(cluster, agent_channel):
    """The agent logged a caller's request id as it came, so a newline in it started a line of the
    caller's choosing in the agent's log (the gateway only ever sends one visible-ASCII token). Such
    an id is replaced now, in the log and in the responses."""
    marker = f"FORGED-{uuid.uuid4().hex}"
    request = generate_pb2.GenerateRequest(
        request_id=f"x\n{marker} ERROR agent [x] forged",
        model=MODELS[0],
        prompt="Hello",
        sampling=generate_pb2.SamplingParams(max_tokens=1),
    )
    code, responses = call_agent(agent_channel, request)
    assert code == grpc.StatusCode.OK
    assert {r.request_id for r in responses} == {responses[0].request_id}
    assert responses[0].request_id.startswith("agent-") and responses[0].request_id.isprintable()
    assert log_lines_starting(cluster, "agent", marker) == []


def test_a_model_name_cannot_forge_gateway_log_lines(cluster, gateway_channel):
    """The gateway logged a failed call's model with %s, so a newline in a gRPC client's model name
    started a line of its choosing in gateway.log ("generate model=nope\nFORGED... failed: NOT_FOUND")."""
    marker = f"FORGED-{uuid.uuid4().hex}"
    request = generate_pb2.GenerateRequest(model=f"nope\n{marker} ERROR gateway [x] forged", prompt="Hello")
    code, _ = call_gateway(gateway_channel, request)
    assert code == grpc.StatusCode.NOT_FOUND
    assert log_lines_starting(cluster, "gateway", marker) == []


def test_the_cluster_survived(cluster, gateway_channel, agent_channel):
    """Runs last in this module: every process is alive, both servers SERVING and still generating."""
    dead = {name: p.returncode for name, p in cluster.processes.items() if p.poll() is not None}
    assert not dead, f"exited: {dead}"
    for channel, service in ((gateway_channel, "prism.v1.Gateway"), (agent_channel, "prism.v1.Agent")):
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    listed = gateway_pb2_grpc.GatewayStub(gateway_channel).ListModels(gateway_pb2.ListModelsRequest(), timeout=10)
    assert {m.name for m in listed.models if m.available} >= set(MODELS)
    for model in MODELS:
        request = generate_pb2.GenerateRequest(
            model=model, prompt="Hello", sampling=generate_pb2.SamplingParams(max_tokens=2, ignore_eos=True)
        )
        for call in (call_gateway, call_agent):
            code, responses = call(gateway_channel if call is call_gateway else agent_channel, request)
            assert code == grpc.StatusCode.OK and responses[-1].usage.completion_tokens == 2


def test_the_scheduler_answers_undecodable_registrations_invalid_argument(cluster):
    """The scheduler's RegisterAgent, given bytes that are not a RegisterAgentRequest (a string
    field that is not UTF-8): INVALID_ARGUMENT, not UNKNOWN; and the scheduler still serves."""
    from prism_client.v1 import scheduler_pb2

    bad = b"\x0a\x02\xff\xfe"  # field 1 (a string) holding bytes that are not UTF-8
    with pytest.raises(DecodeError):
        scheduler_pb2.RegisterAgentRequest.FromString(bad)
    with grpc.insecure_channel(cluster.scheduler_address) as channel:
        register = channel.unary_unary(
            "/prism.v1.Scheduler/RegisterAgent",
            request_serializer=None,
            response_deserializer=scheduler_pb2.RegisterAgentResponse.FromString,
        )
        with pytest.raises(grpc.RpcError) as caught:
            register(bad, timeout=DEADLINE_S)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=DEADLINE_S
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
