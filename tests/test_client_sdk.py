"""The gRPC client SDK (prism_client, clients/python).

Most tests here need no cluster: request building and argument checks are
pure, and the status-code mapping runs against a real grpc.aio server whose
Gateway servicer only fails (StatusCodeOnlyGatewayFake). The tests in
TestAgainstLocalCluster use the `cluster` fixture: real gateway, agent and
engines serving tiny-llama and tiny-qwen2.
"""

from __future__ import annotations

import asyncio
import gc
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest

from prism_client import (
    AsyncPrismClient,
    AuthenticationError,
    Completion,
    CompletionChunk,
    InvalidRequestError,
    ModelNotFoundError,
    PermissionDeniedError,
    PrismClient,
    PrismError,
    RateLimitedError,
    UnavailableError,
    Usage,
    build_generate_request,
    chunk_from_response,
    completion_from_chunks,
)
from prism_client.v1 import gateway_pb2, gateway_pb2_grpc, generate_pb2

MODELS = ("tiny-llama", "tiny-qwen2")


# --- fakes served by a real grpc.aio server ----------------------------------


class StatusCodeOnlyGatewayFake(gateway_pb2_grpc.GatewayServicer):
    """Not a gateway: every call fails at once with the status code, details
    and x-request-id trailing metadata the test set. It exists to check how
    the SDK maps gRPC statuses to its errors."""

    def __init__(self) -> None:
        self.code = grpc.StatusCode.UNKNOWN
        self.details = "set by the test"
        self.request_id: str | None = None

    async def _fail(self, context: grpc.aio.ServicerContext) -> None:
        metadata = (("x-request-id", self.request_id),) if self.request_id else ()
        await context.abort(self.code, self.details, trailing_metadata=metadata)

    async def Generate(self, request, context):
        await self._fail(context)
        yield generate_pb2.GenerateResponse()  # never reached; makes this a streaming handler

    async def ListModels(self, request, context):
        await self._fail(context)


class EndlessStreamGatewayFake(gateway_pb2_grpc.GatewayServicer):
    """Not a gateway: Generate streams one-token pieces until the client
    cancels, and records that the cancellation reached the server."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()

    async def Generate(self, request, context):
        try:
            while True:
                yield generate_pb2.GenerateResponse(request_id=request.request_id or "endless", text="x", token_ids=[7])
                await asyncio.sleep(0.01)
        finally:
            # The loop has no end of its own, so leaving it means the call was
            # torn down. (Not `except CancelledError`: suspended at the yield,
            # the handler is closed with GeneratorExit instead; and
            # context.cancelled() reads False here even then.)
            self.cancelled.set()


class FlakyGatewayFake(gateway_pb2_grpc.GatewayServicer):
    """Not a gateway: its first `failures` calls fail with `code`; later ones answer (ListModels with one
    model, Generate with `tokens` tokens and then, with `fail_after_tokens`, a failure). It counts calls,
    to check which failures the SDK tries again."""

    def __init__(self) -> None:
        self.failures, self.code, self.calls = 0, grpc.StatusCode.UNAVAILABLE, 0
        self.fail_after_tokens = False

    async def _maybe_fail(self, context: grpc.aio.ServicerContext) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            await context.abort(self.code, f"flaky call {self.calls}")

    async def Generate(self, request, context):
        await self._maybe_fail(context)
        yield generate_pb2.GenerateResponse(request_id="flaky", text="a", token_ids=[1])
        if self.fail_after_tokens:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "broke mid-stream")
        yield generate_pb2.GenerateResponse(
            request_id="flaky",
            text="b",
            token_ids=[2],
            finish_reason=generate_pb2.FINISH_REASON_STOP,
            usage=generate_pb2.Usage(prompt_tokens=1, completion_tokens=2),
        )

    async def ListModels(self, request, context):
        await self._maybe_fail(context)
        return gateway_pb2.ListModelsResponse(models=[gateway_pb2.ModelInfo(name="m", available=True, max_context=8)])


@contextmanager
def serve_in_thread(servicer: gateway_pb2_grpc.GatewayServicer) -> Iterator[str]:
    """Serves `servicer` from a grpc.aio server on its own event loop thread,
    so blocking clients in the test's thread can call it; yields host:port."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-gateway", daemon=True)
    thread.start()
    server_holder: list[grpc.aio.Server] = []

    async def start() -> int:
        server = grpc.aio.server()
        gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        server_holder.append(server)
        return port

    port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server_holder[0].stop(grace=None), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@pytest.fixture(scope="module")
def failing_gateway() -> Iterator[tuple[StatusCodeOnlyGatewayFake, str]]:
    fake = StatusCodeOnlyGatewayFake()
    with serve_in_thread(fake) as target:
        yield fake, target


@pytest.fixture()
def endless_gateway() -> Iterator[tuple[EndlessStreamGatewayFake, str]]:
    fake = EndlessStreamGatewayFake()
    with serve_in_thread(fake) as target:
        yield fake, target


# --- building requests -------------------------------------------------------


def test_prompt_request_leaves_unset_sampling_parameters_unset():
    request = build_generate_request("tiny-llama", "Hello")
    assert request.model == "tiny-llama"
    assert request.WhichOneof("input") == "prompt" and request.prompt == "Hello"
    assert request.request_id == ""  # the gateway assigns one
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        assert not request.sampling.HasField(name), name
    assert list(request.sampling.stop) == [] and request.sampling.ignore_eos is False


def test_every_sampling_parameter_is_carried():
    request = build_generate_request(
        "m",
        "p",
        max_tokens=5,
        temperature=0.5,
        top_p=0.25,
        seed=-3,
        stop=["a", "bc"],
        ignore_eos=True,
        request_id="req-1",
    )
    s = request.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.seed) == (5, 0.5, 0.25, -3)
    assert list(s.stop) == ["a", "bc"] and s.ignore_eos is True
    assert request.request_id == "req-1"


def test_zero_values_are_sent_not_dropped():
    # temperature 0 means greedy and max_tokens 0 must reach the gateway to be
    # rejected; neither may fall back to "unset".
    s = build_generate_request("m", "p", temperature=0.0, max_tokens=0).sampling
    assert s.HasField("temperature") and s.temperature == 0.0
    assert s.HasField("max_tokens") and s.max_tokens == 0


def test_a_single_stop_string_becomes_a_list():
    assert list(build_generate_request("m", "p", stop="\n").sampling.stop) == ["\n"]


def test_empty_prompt_still_selects_the_prompt_input():
    assert build_generate_request("m", "").WhichOneof("input") == "prompt"


def test_messages_become_a_chat_input():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    request = build_generate_request("tiny-qwen2", messages=messages)
    assert request.WhichOneof("input") == "chat"
    assert [(m.role, m.content) for m in request.chat.messages] == [("system", "Be brief."), ("user", "Hi")]
    assert not request.chat.HasField("add_generation_prompt")  # the engine's default: true


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"prompt": "p", "messages": [{"role": "user", "content": "Hi"}]},
    ],
    ids=["neither", "both"],
)
def test_exactly_one_of_prompt_and_messages(kwargs):
    with pytest.raises(ValueError, match="exactly one of prompt and messages"):
        build_generate_request("m", **kwargs)


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "user"}],
        [{"role": "user", "content": "Hi", "name": "bob"}],
        [{"role": "user", "content": 3}],
        ["Hi"],
        {"role": "user", "content": "Hi"},
    ],
    ids=["empty", "no-content", "extra-key", "non-str-content", "not-a-dict", "not-a-list"],
)
def test_malformed_messages_are_rejected(messages):
    with pytest.raises(ValueError):
        build_generate_request("m", messages=messages)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"model": "", "prompt": "p"},
        {"model": "m", "prompt": 5},
        {"model": "m", "prompt": "p", "stop": ["a", 1]},
    ],
    ids=["empty-model", "non-str-prompt", "non-str-stop"],
)
def test_malformed_arguments_are_rejected(kwargs):
    with pytest.raises(ValueError):
        build_generate_request(**kwargs)


def test_client_methods_check_arguments_before_calling():
    # Port 9 (discard) has no gRPC server: reaching the network would fail
    # with UnavailableError, not ValueError.
    with PrismClient("127.0.0.1:9", timeout_s=2) as client:
        with pytest.raises(ValueError):
            client.generate("m")
        with pytest.raises(ValueError):
            client.generate_stream("m", "p", messages=[{"role": "user", "content": "Hi"}])  # raised before iterating
        with pytest.raises(TypeError):
            client.generate("m", "p", max_token=3)  # a misspelt option is not silently ignored


async def test_async_client_methods_check_arguments_before_calling():
    async with AsyncPrismClient("127.0.0.1:9", timeout_s=2) as client:
        with pytest.raises(ValueError):
            await client.generate("m")
        with pytest.raises(ValueError):
            client.generate_stream("m")  # raised at the call, not at the first step


# --- reading responses -------------------------------------------------------


def test_chunk_without_finish_reason_has_no_usage():
    chunk = chunk_from_response(generate_pb2.GenerateResponse(request_id="r", text="ab", token_ids=[1, 2]))
    assert chunk == CompletionChunk(request_id="r", text="ab", token_ids=[1, 2], finish_reason=None, usage=None)


@pytest.mark.parametrize(
    "reason, name", [(generate_pb2.FINISH_REASON_STOP, "stop"), (generate_pb2.FINISH_REASON_LENGTH, "length")]
)
def test_last_chunk_carries_finish_reason_and_usage(reason, name):
    response = generate_pb2.GenerateResponse(
        request_id="r", text="", finish_reason=reason, usage=generate_pb2.Usage(prompt_tokens=4, completion_tokens=2)
    )
    chunk = chunk_from_response(response)
    assert chunk.finish_reason == name and chunk.usage == Usage(prompt_tokens=4, completion_tokens=2)


def test_chunks_join_into_a_completion():
    chunks = [
        CompletionChunk("r", "Hel", [1, 2], None, None),
        CompletionChunk("r", "lo", [3], None, None),
        CompletionChunk("r", "", [], "length", Usage(prompt_tokens=5, completion_tokens=3)),
    ]
    assert completion_from_chunks(chunks) == Completion(
        request_id="r", text="Hello", token_ids=[1, 2, 3], finish_reason="length", prompt_tokens=5, completion_tokens=3
    )


@pytest.mark.parametrize(
    "chunks",
    [
        [],
        [CompletionChunk("r", "a", [1], None, None)],
        [CompletionChunk("r", "a", [1], "stop", None)],
    ],
    ids=["empty", "no-finish-reason", "no-usage"],
)
def test_a_stream_that_breaks_the_contract_is_an_error(chunks):
    with pytest.raises(PrismError) as caught:
        completion_from_chunks(chunks, request_id="mine")
    assert caught.value.code == grpc.StatusCode.UNKNOWN
    assert caught.value.request_id == (chunks[0].request_id if chunks else "mine")


# --- status codes become typed errors ----------------------------------------

STATUS_TO_ERROR = [
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidRequestError),
    (grpc.StatusCode.NOT_FOUND, ModelNotFoundError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, RateLimitedError),
    (grpc.StatusCode.UNAVAILABLE, UnavailableError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, UnavailableError),
    (grpc.StatusCode.UNAUTHENTICATED, AuthenticationError),
    (grpc.StatusCode.PERMISSION_DENIED, PermissionDeniedError),
    (grpc.StatusCode.INTERNAL, PrismError),
    (grpc.StatusCode.DATA_LOSS, PrismError),
]


def _check_error(caught: pytest.ExceptionInfo, code: grpc.StatusCode, error_class: type[PrismError]) -> None:
    assert type(caught.value) is error_class
    assert caught.value.code == code
    assert caught.value.message == "fake failure"


@pytest.mark.parametrize("code, error_class", STATUS_TO_ERROR, ids=[c.name for c, _ in STATUS_TO_ERROR])
def test_sync_client_maps_status_codes(failing_gateway, code, error_class):
    fake, target = failing_gateway
    fake.code, fake.details, fake.request_id = code, "fake failure", "srv-1"
    with PrismClient(target, timeout_s=10) as client:
        with pytest.raises(error_class) as caught:
            client.list_models()
        _check_error(caught, code, error_class)
        with pytest.raises(error_class) as caught:
            client.generate("tiny-llama", "Hello")
        _check_error(caught, code, error_class)
        assert caught.value.request_id == "srv-1"  # from the trailing metadata
        stream = client.generate_stream("tiny-llama", "Hello")
        with pytest.raises(error_class) as caught:
            next(stream)
        _check_error(caught, code, error_class)


@pytest.mark.parametrize("code, error_class", STATUS_TO_ERROR, ids=[c.name for c, _ in STATUS_TO_ERROR])
async def test_async_client_maps_status_codes(failing_gateway, code, error_class):
    fake, target = failing_gateway
    fake.code, fake.details, fake.request_id = code, "fake failure", "srv-2"
    async with AsyncPrismClient(target, timeout_s=10) as client:
        with pytest.raises(error_class) as caught:
            await client.list_models()
        _check_error(caught, code, error_class)
        with pytest.raises(error_class) as caught:
            await client.generate("tiny-llama", "Hello")
        _check_error(caught, code, error_class)
        assert caught.value.request_id == "srv-2"
        with pytest.raises(error_class) as caught:
            async for _ in client.generate_stream("tiny-llama", "Hello"):
                pass
        _check_error(caught, code, error_class)


def test_error_keeps_the_callers_request_id(failing_gateway):
    fake, target = failing_gateway
    fake.code, fake.details, fake.request_id = grpc.StatusCode.NOT_FOUND, "fake failure", None
    with PrismClient(target, timeout_s=10) as client:
        with pytest.raises(ModelNotFoundError) as caught:
            client.generate("nope", "Hello", request_id="client-7")
    assert caught.value.request_id == "client-7"
    assert "NOT_FOUND" in str(caught.value) and "client-7" in str(caught.value)


# --- retries -------------------------------------------------------------------


@pytest.fixture()
def flaky_gateway() -> Iterator[tuple[FlakyGatewayFake, str]]:
    fake = FlakyGatewayFake()
    with serve_in_thread(fake) as target:
        yield fake, target


def test_retry_delays_back_off_exponentially_with_jitter_up_to_a_cap():
    import random

    from prism_client.client import RETRY_BASE_S, RETRY_CAP_S, retry_delays

    delays = retry_delays(7, random.Random(1))
    ceilings = [min(RETRY_CAP_S, RETRY_BASE_S * 2**i) for i in range(7)]
    assert len(delays) == 7 and all(c / 2 <= d <= c for d, c in zip(delays, ceilings))
    assert ceilings[-1] == RETRY_CAP_S and retry_delays(0) == []


def test_a_call_failing_unavailable_before_any_answer_is_tried_again(flaky_gateway):
    fake, target = flaky_gateway
    fake.failures = 2
    with PrismClient(target, timeout_s=10) as client:
        assert [m.name for m in client.list_models()] == ["m"] and fake.calls == 3
        fake.calls = 0
        assert client.generate("m", "hi").text == "ab" and fake.calls == 3
        fake.calls = 0
        assert "".join(c.text for c in client.generate_stream("m", "hi")) == "ab" and fake.calls == 3
    # More failures than retries: the last one surfaces, after 1 + retries calls.
    fake.calls, fake.failures = 0, 10
    with PrismClient(target, timeout_s=10, retries=1) as client, pytest.raises(UnavailableError):
        client.list_models()
    assert fake.calls == 2


def test_no_retry_after_tokens_came_back_for_other_codes_or_when_disabled(flaky_gateway):
    fake, target = flaky_gateway
    fake.fail_after_tokens = True
    with PrismClient(target, timeout_s=10) as client:
        stream = client.generate_stream("m", "hi")
        assert next(stream).text == "a"
        with pytest.raises(UnavailableError, match="broke mid-stream"):
            next(stream)
    assert fake.calls == 1  # the caller has a token: trying again would repeat it
    fake.calls, fake.failures, fake.fail_after_tokens = 0, 1, False
    fake.code = grpc.StatusCode.INVALID_ARGUMENT
    with PrismClient(target, timeout_s=10) as client, pytest.raises(InvalidRequestError):
        client.list_models()
    assert fake.calls == 1
    fake.calls, fake.code = 0, grpc.StatusCode.UNAVAILABLE
    with PrismClient(target, timeout_s=10, retries=0) as client, pytest.raises(UnavailableError):
        client.list_models()
    assert fake.calls == 1
    with pytest.raises(ValueError, match="retries"):
        PrismClient(target, retries=-1)


async def test_the_async_client_tries_again_too(flaky_gateway):
    fake, target = flaky_gateway
    fake.failures = 2
    async with AsyncPrismClient(target, timeout_s=10) as client:
        assert [m.name for m in await client.list_models()] == ["m"] and fake.calls == 3
        fake.calls = 0
        assert (await client.generate("m", "hi")).text == "ab" and fake.calls == 3


def test_retries_stop_at_the_calls_deadline(flaky_gateway):
    """A deadline shorter than the backoff: the call ends with its deadline, not after every retry."""
    import time

    fake, target = flaky_gateway
    fake.failures = 100
    started = time.monotonic()
    with PrismClient(target, timeout_s=0.15, retries=50) as client, pytest.raises(UnavailableError):
        client.list_models()
    assert time.monotonic() - started < 5 and fake.calls < 10


def test_unreachable_gateway_is_unavailable():
    with PrismClient("127.0.0.1:9", timeout_s=5) as client:
        with pytest.raises(UnavailableError):
            client.list_models()


# --- closing a stream early cancels the call ---------------------------------


def test_closing_a_sync_stream_cancels_the_call(endless_gateway):
    fake, target = endless_gateway
    with PrismClient(target, timeout_s=30) as client:
        stream = client.generate_stream("any", "Hello")
        first = next(stream)
        assert (first.text, first.token_ids, first.finish_reason, first.usage) == ("x", [7], None, None)
        stream.close()
        assert fake.cancelled.wait(timeout=10), "the server never saw the cancellation"


def test_leaving_a_for_loop_cancels_the_call(endless_gateway):
    fake, target = endless_gateway
    with PrismClient(target, timeout_s=30) as client:
        for _ in client.generate_stream("any", "Hello"):
            break  # the dropped generator is closed, which cancels the call
        gc.collect()
        assert fake.cancelled.wait(timeout=10), "the server never saw the cancellation"


async def test_closing_an_async_stream_cancels_the_call(endless_gateway):
    fake, target = endless_gateway
    async with AsyncPrismClient(target, timeout_s=30) as client:
        stream = client.generate_stream("any", "Hello", request_id="async-1")
        first = await anext(stream)
        assert first.request_id == "async-1" and first.text == "x"
        await stream.aclose()
        assert await asyncio.to_thread(fake.cancelled.wait, 10), "the server never saw the cancellation"


# --- against the real cluster ------------------------------------------------


class TestAgainstLocalCluster:
    """Real gateway, agent and engines (the session's `cluster` fixture)."""

    @pytest.fixture()
    def client(self, cluster) -> Iterator[PrismClient]:
        with PrismClient(cluster.gateway_grpc, timeout_s=120) as client:
            yield client

    def test_lists_the_configured_models(self, client):
        models = {m.name: m for m in client.list_models()}
        for name in MODELS:
            assert models[name].available, models[name]
            assert models[name].max_context > 0

    @pytest.mark.parametrize("model", MODELS)
    def test_greedy_generate_equals_the_joined_stream(self, client, model):
        args = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
        done = client.generate(model, "The capital of France is", **args)
        chunks = list(client.generate_stream(model, "The capital of France is", **args))
        assert done.text == "".join(c.text for c in chunks)
        assert done.token_ids == [t for c in chunks for t in c.token_ids]
        assert done.finish_reason == "length" == chunks[-1].finish_reason
        assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
        # The same prompt a second time: part of it may come from the prefix cache, and its usage says so.
        assert chunks[-1].usage == Usage(
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
            cached_prompt_tokens=chunks[-1].usage.cached_prompt_tokens,
        )
        assert done.request_id and all(c.request_id == chunks[0].request_id for c in chunks)

    def test_usage_counts_prompt_and_completion_tokens(self, client):
        short = client.generate("tiny-llama", "Hi", max_tokens=5, temperature=0.0, ignore_eos=True)
        longer = client.generate(
            "tiny-llama", "Hi there, how are you today?", max_tokens=5, temperature=0.0, ignore_eos=True
        )
        assert 0 < short.prompt_tokens < longer.prompt_tokens
        assert short.completion_tokens == len(short.token_ids) == 5

    def test_a_repeated_prompt_is_served_from_the_prefix_cache_and_its_usage_says_so(self, client, cluster):
        import httpx

        prompt = "You are a helpful assistant who answers briefly and well. " * 2 + "Question: what is a cache?"
        args = dict(max_tokens=4, temperature=0.0, ignore_eos=True)
        first = client.generate("tiny-qwen2", prompt, **args)
        again = client.generate("tiny-qwen2", prompt, **args)
        assert again.token_ids == first.token_ids
        # Whole 16-token blocks, never the prompt's last token (its logits give the first new one).
        assert 16 <= again.cached_prompt_tokens < again.prompt_tokens
        assert again.cached_prompt_tokens % 16 == 0
        rest = httpx.post(
            f"{cluster.http_url}/v1/completions", timeout=60, json={"model": "tiny-qwen2", "prompt": prompt, **args}
        ).json()
        assert rest["usage"]["prompt_tokens_details"] == {"cached_tokens": again.cached_prompt_tokens}
        # Visible per model: the agent's status and the gateway's /metrics count the hits.
        from prism_client.v1 import agent_pb2, agent_pb2_grpc

        with grpc.insecure_channel(cluster.agent_address) as channel:
            status = agent_pb2_grpc.AgentStub(channel).GetStatus(agent_pb2.GetStatusRequest(), timeout=10)
        engine = next(e for e in status.engines if e.model == "tiny-qwen2")
        assert engine.prefix_cache_hit_tokens >= 2 * again.cached_prompt_tokens
        assert engine.prefix_cache_queried_tokens >= 3 * again.prompt_tokens
        assert engine.kv_cached_bytes > 0
        metrics = httpx.get(f"{cluster.http_url}/metrics", timeout=30).text
        hits = [
            line
            for line in metrics.splitlines()
            if line.startswith("prism_agent_engine_prefix_cache_hit_tokens{") and 'model="tiny-qwen2"' in line
        ]
        assert hits and float(hits[0].split()[-1]) >= 2 * again.cached_prompt_tokens, hits

    def test_max_tokens_ends_with_length(self, client):
        done = client.generate("tiny-qwen2", "Count:", max_tokens=3, temperature=0.0, ignore_eos=True)
        assert done.finish_reason == "length" and done.completion_tokens == 3

    def test_stop_string_ends_with_stop_and_is_not_returned(self, client):
        full = client.generate("tiny-llama", "Once upon a time", max_tokens=24, temperature=0.0, ignore_eos=True).text
        # A bit of the middle of the greedy output: greedy decoding repeats the
        # output, so the second run must stop where that bit first appears.
        middle = len(full) // 2
        stop = full[middle : middle + 3]
        assert stop, f"too little text to pick a stop string from: {full!r}"
        done = client.generate(
            "tiny-llama", "Once upon a time", max_tokens=24, temperature=0.0, ignore_eos=True, stop=stop
        )
        assert done.finish_reason == "stop"
        assert done.text == full[: full.index(stop)]

    def test_seeded_sampling_is_reproducible(self, client):
        args = dict(max_tokens=8, temperature=1.0, seed=1234, ignore_eos=True)
        assert (
            client.generate("tiny-qwen2", "Hello", **args).token_ids
            == client.generate("tiny-qwen2", "Hello", **args).token_ids
        )

    def test_chat_messages(self, client):
        done = client.generate(
            "tiny-qwen2", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0.0, ignore_eos=True
        )
        assert done.completion_tokens == 4 and done.prompt_tokens > 1

    def test_unknown_model_is_model_not_found(self, client):
        with pytest.raises(ModelNotFoundError) as caught:
            client.generate("no-such-model", "Hello", request_id="sdk-unknown-model")
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
        assert caught.value.request_id == "sdk-unknown-model"
        with pytest.raises(ModelNotFoundError):
            next(client.generate_stream("no-such-model", "Hello"))

    @pytest.mark.parametrize(
        "bad",
        [
            {"max_tokens": 0},
            {"max_tokens": -5},
            {"temperature": -1.0},
            {"top_p": 1.5},
        ],
        ids=lambda bad: ",".join(f"{k}={v}" for k, v in bad.items()),
    )
    def test_invalid_parameters_are_invalid_requests(self, client, bad):
        with pytest.raises(InvalidRequestError) as caught:
            client.generate("tiny-llama", "Hello", **bad)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT

    def test_prompt_over_the_context_is_an_invalid_request(self, client):
        max_context = {m.name: m.max_context for m in client.list_models()}["tiny-llama"]
        with pytest.raises(InvalidRequestError):
            client.generate("tiny-llama", "hello " * (max_context + 16), max_tokens=1)

    async def test_async_client(self, cluster):
        async with AsyncPrismClient(cluster.gateway_grpc, timeout_s=120) as client:
            assert set(MODELS) <= {m.name for m in await client.list_models()}
            args = dict(max_tokens=10, temperature=0.0, ignore_eos=True)
            done = await client.generate("tiny-llama", "Hello", **args)
            chunks = [c async for c in client.generate_stream("tiny-llama", "Hello", **args)]
            assert done.text == "".join(c.text for c in chunks)
            assert done.token_ids == [t for c in chunks for t in c.token_ids]
            assert (done.finish_reason, done.completion_tokens) == ("length", 10)
            with pytest.raises(ModelNotFoundError):
                await client.generate("no-such-model", "Hello")


def test_the_sdk_alone_installs_in_a_fresh_venv_and_talks_to_the_cluster(cluster, tmp_path):
    """`pip install ./clients/python` into a new venv brings grpcio and protobuf and nothing of the server
    (no torch, no services), and that venv's client generates on the running cluster what this one does."""
    import os
    import subprocess
    import venv
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}  # nothing of ours
    env_dir = tmp_path / "sdk-venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(root / "clients" / "python")],
        capture_output=True,
        text=True,
        timeout=600,
        env=clean,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    installed = subprocess.run(
        [str(python), "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True, timeout=120, env=clean
    ).stdout.lower()
    assert "prism-client==" in installed and "grpcio==" in installed and "protobuf==" in installed
    assert "torch" not in installed and "prism-serving" not in installed
    script = (
        "import json, sys, importlib.util\n"
        "from prism_client import PrismClient\n"
        "with PrismClient(sys.argv[1], timeout_s=120) as c:\n"
        "    done = c.generate('tiny-llama', 'Hello there', max_tokens=6, temperature=0.0, ignore_eos=True)\n"
        "    names = sorted(m.name for m in c.list_models())\n"
        "print(json.dumps({'tokens': done.token_ids, 'names': names,\n"
        "                  'services': importlib.util.find_spec('services') is not None}))\n"
    )
    run = subprocess.run(
        [str(python), "-c", script, cluster.gateway_grpc],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=clean,
    )  # not the checkout: its folders must not import
    assert run.returncode == 0, run.stdout + run.stderr
    out = json.loads(run.stdout)
    assert set(MODELS) <= set(out["names"]) and out["services"] is False
    with PrismClient(cluster.gateway_grpc, timeout_s=120) as here:
        mine = here.generate("tiny-llama", "Hello there", max_tokens=6, temperature=0.0, ignore_eos=True)
    assert out["tokens"] == mine.token_ids


def test_the_sdk_imports_no_service_code():
    """The SDK depends on grpcio, protobuf and the generated stubs alone (a client installs no server)."""
    import subprocess
    import sys

    code = (
        "import sys, prism_client; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('services', 'torch', 'fastapi', 'aetcd')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
