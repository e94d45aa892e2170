"""The gateway's per-client limits (services/gateway/limits.py, access.py):
the token bucket and stream slots on an injected clock, the request checks,
the flags, then real gateways (a subprocess over a real etcd with a scripted
fake agent) over REST and gRPC: 413, 400, 429 with Retry-After, stream slots
freed on every end path (cancellation included), per-key overrides and the
same limits on a gateway without keys."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator

import grpc
import httpx
import pytest
from test_gateway_auth import KeyedGateway, assert_openai_error, bearer, completion, grpc_auth, start_keyed_gateway
from test_gateway_support import FakeAgent, stop_process

from prism_client.v1 import gateway_pb2, gateway_pb2_grpc, generate_pb2
from services.common.etcd_server import EmbeddedEtcd
from services.gateway.access import AccessControl
from services.gateway.auth import ApiKey, KeyStore, digest_of
from services.gateway.errors import KeyRateLimited, MaxTokensTooLarge, PromptTooLong, TooManyStreams
from services.gateway.limits import (
    LIMIT_FIELDS,
    LimitOverrides,
    Limits,
    RateLimiter,
    StreamSlots,
    TokenBucket,
    check_generate_limits,
    parse_limit_overrides,
    retry_after_seconds,
)
from services.gateway.metrics import GatewayMetrics
from services.gateway.server import limits_of, parse_args
from tests.prometheus_text import metric_values


class FakeClock:
    def __init__(self, now: float = 100.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


# ---- the token bucket -------------------------------------------------------------------


def test_a_bucket_allows_its_burst_then_refills_at_its_rate():
    bucket = TokenBucket(rate_per_s=2.0, size=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)  # one token comes every 0.5 s
    assert bucket.take(0.25) == pytest.approx(0.25)  # half of one is there already
    assert bucket.take(0.5) == 0.0
    assert bucket.take(0.5) == pytest.approx(0.5)


def test_a_quiet_bucket_fills_to_its_size_and_no_further():
    bucket = TokenBucket(rate_per_s=1.0, size=2, now=0.0)
    bucket.take(0.0), bucket.take(0.0)
    assert [bucket.take(1000.0) for _ in range(3)][:2] == [0.0, 0.0]
    assert bucket.take(1000.0) == pytest.approx(1.0)


def test_a_clock_going_backwards_adds_nothing():
    bucket = TokenBucket(rate_per_s=1.0, size=1, now=10.0)
    assert bucket.take(10.0) == 0.0
    assert bucket.take(5.0) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "wait_s, seconds", [(0.0001, 1), (0.5, 1), (1.0, 1), (1.01, 2), (2.0000000001, 2), (99.2, 100)]
)
def test_retry_after_is_whole_seconds_rounded_up(wait_s, seconds):
    assert retry_after_seconds(wait_s) == seconds


def test_the_rate_limiter_keeps_a_bucket_per_client():
    clock = FakeClock()
    limiter = RateLimiter(clock)
    limits = Limits(rate_limit_rps=0.5, rate_limit_burst=2)
    assert [limiter.take("a", limits) for _ in range(2)] == [0.0, 0.0]
    assert limiter.take("a", limits) == pytest.approx(2.0)
    assert limiter.take("b", limits) == 0.0  # b has its own bucket
    clock.now += 2.0
    assert limiter.take("a", limits) == 0.0


def test_no_rate_means_no_limit_and_the_default_burst_is_a_seconds_worth():
    limiter = RateLimiter(FakeClock())
    assert all(limiter.take("a", Limits()) == 0.0 for _ in range(1000))
    assert Limits(rate_limit_rps=2.5).bucket_size == 3 and Limits(rate_limit_rps=0.1).bucket_size == 1
    assert Limits(rate_limit_rps=2.5, rate_limit_burst=10).bucket_size == 10
    limits = Limits(rate_limit_rps=2.5)
    assert [limiter.take("b", limits) > 0 for _ in range(4)] == [False, False, False, True]


# ---- stream slots ---------------------------------------------------------------------------


def test_stream_slots_are_counted_per_client_and_freed_once():
    slots = StreamSlots()
    first = slots.acquire("a", 2)
    second = slots.acquire("a", 2)
    assert first and second and slots.acquire("a", 2) is None
    assert slots.acquire("b", 2) is not None
    first.release()
    first.release()  # a second release (another end path) frees nothing more
    assert slots.in_use("a") == 1
    third = slots.acquire("a", 2)
    assert third is not None and slots.acquire("a", 2) is None
    second.release(), third.release()
    assert slots.in_use("a") == 0


def test_no_stream_limit_means_unlimited():
    slots = StreamSlots()
    assert all(slots.acquire("a", 0) is not None for _ in range(1000))


# ---- request checks ---------------------------------------------------------------------------


def test_prompt_length_is_counted_in_characters_over_all_chat_messages():
    limits = Limits(max_prompt_chars=10)
    check_generate_limits(generate_pb2.GenerateRequest(prompt="é" * 10), limits)
    with pytest.raises(PromptTooLong) as caught:
        check_generate_limits(generate_pb2.GenerateRequest(prompt="x" * 11), limits)
    assert caught.value.param == "prompt" and "11 characters" in caught.value.message
    chat = generate_pb2.ChatInput(
        messages=[
            generate_pb2.ChatMessage(role="system", content="x" * 6),
            generate_pb2.ChatMessage(role="user", content="y" * 5),
        ]
    )
    with pytest.raises(PromptTooLong) as caught:
        check_generate_limits(generate_pb2.GenerateRequest(chat=chat), limits)
    assert caught.value.param == "messages"


def test_max_tokens_over_the_cap_is_refused_and_unset_is_left_to_the_engine():
    limits = Limits(max_tokens_cap=8)
    check_generate_limits(
        generate_pb2.GenerateRequest(prompt="x", sampling=generate_pb2.SamplingParams(max_tokens=8)), limits
    )
    check_generate_limits(generate_pb2.GenerateRequest(prompt="x"), limits)
    with pytest.raises(MaxTokensTooLarge) as caught:
        check_generate_limits(
            generate_pb2.GenerateRequest(prompt="x", sampling=generate_pb2.SamplingParams(max_tokens=9)), limits
        )
    assert (caught.value.param, caught.value.http_status) == ("max_tokens", 400)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"max_request_bytes": 0}, "at least 1"),
        ({"rate_limit_rps": float("inf")}, "must be a number"),
        ({"rate_limit_rps": "5"}, "must be a number"),
        ({"rate_limit_burst": 2.0}, "whole number"),
    ],
)
def test_bad_limit_overrides(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_limit_overrides(raw, "entry 0")


def test_limit_names_agree():
    # Three lists of the same names: the dataclass, the checks, and the overrides' type.
    names = [f.name for f in dataclasses.fields(Limits)]
    assert list(LIMIT_FIELDS) == names
    assert list(LimitOverrides.__annotations__) == names


def test_flags_set_every_clients_defaults():
    args = parse_args(
        [
            "--max-request-bytes",
            "1000",
            "--max-prompt-chars",
            "50",
            "--max-tokens-cap",
            "9",
            "--max-concurrent-streams",
            "3",
            "--rate-limit-rps",
            "1.5",
            "--rate-limit-burst",
            "4",
        ]
    )
    assert limits_of(args) == Limits(
        max_request_bytes=1000,
        max_prompt_chars=50,
        max_tokens_cap=9,
        max_concurrent_streams=3,
        rate_limit_rps=1.5,
        rate_limit_burst=4,
    )
    assert limits_of(parse_args([])) == Limits()
    assert Limits().max_concurrent_streams == 0 and Limits().rate_limit_rps == 0  # off unless asked for


@pytest.mark.parametrize(
    "flags",
    [
        ["--max-tokens-cap", "0"],
        ["--rate-limit-rps", "-1"],
        ["--max-request-bytes", "1.5"],
        ["--rate-limit-rps", "nan"],
    ],
)
def test_bad_limit_flags_are_refused(flags, capsys):
    with pytest.raises(SystemExit) as caught:
        parse_args(flags)
    assert caught.value.code == 2 and flags[0] in capsys.readouterr().err


def test_access_control_refusals_carry_retry_after_and_are_counted():
    clock = FakeClock()
    metrics = GatewayMetrics()
    keys = KeyStore([ApiKey("k", digest_of("sk-k"), None, {"rate_limit_rps": 0.25, "max_concurrent_streams": 1})])
    access = AccessControl(keys, Limits(rate_limit_rps=100), metrics, clock=clock)
    client = access.authenticate("Bearer sk-k", "rest")
    access.admit(client, "rest")
    with pytest.raises(KeyRateLimited) as caught:
        access.admit(client, "grpc")
    assert caught.value.retry_after_s == 4 and caught.value.http_headers() == {"Retry-After": "4"}
    clock.now += 3.5
    with pytest.raises(KeyRateLimited) as caught:
        access.admit(client, "rest")
    assert caught.value.retry_after_s == 1  # 0.5 s left, rounded up
    slot = access.open_stream(client, "rest")
    with pytest.raises(TooManyStreams):
        access.open_stream(client, "grpc")
    slot.release()
    access.open_stream(client, "grpc").release()
    sample = metrics.registry.get_sample_value
    assert sample("prism_gateway_rejected_requests_total", {"api": "grpc", "reason": "rate_limited", "key": "k"}) == 1
    assert sample("prism_gateway_rejected_requests_total", {"api": "rest", "reason": "rate_limited", "key": "k"}) == 1
    assert (
        sample("prism_gateway_rejected_requests_total", {"api": "grpc", "reason": "too_many_streams", "key": "k"}) == 1
    )


# ---- a gateway with per-key limits ------------------------------------------------------------

MODEL = "limits-echo"
TIGHT_KEY = "sk-tight"  # small limits of its own, one generation at a time
RATED_KEY = "sk-rated"  # 2 requests, then one per 100 s
PLAIN_KEY = "sk-plain"  # the gateway's flags' limits
TIGHT_BYTES, TIGHT_CHARS, TIGHT_TOKENS = 600, 40, 8
FLAG_TOKENS = 100


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    """Polls a condition that becomes true once the gateway catches up (not a timing assertion)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


@pytest.fixture(scope="module")
def limits_etcd(tmp_path_factory) -> Iterator[EmbeddedEtcd]:
    etcd = EmbeddedEtcd(tmp_path_factory.mktemp("limits-etcd"))
    etcd.start()
    yield etcd
    etcd.stop()


@pytest.fixture(scope="module")
def limits_agent() -> Iterator[FakeAgent]:
    agent = FakeAgent()
    yield agent
    agent.stop()


@pytest.fixture(scope="module")
def limited(tmp_path_factory, limits_etcd, limits_agent) -> Iterator[KeyedGateway]:
    state = tmp_path_factory.mktemp("limited-gateway")
    keys_file = state / "keys.json"
    keys_file.write_text(f"""[
  {{"name": "tight", "key": "{TIGHT_KEY}", "limits": {{"max_request_bytes": {TIGHT_BYTES},
    "max_prompt_chars": {TIGHT_CHARS}, "max_tokens_cap": {TIGHT_TOKENS}, "max_concurrent_streams": 1}}}},
  {{"name": "rated", "key": "{RATED_KEY}", "limits": {{"rate_limit_rps": 0.01, "rate_limit_burst": 2}}}},
  {{"name": "plain", "key": "{PLAIN_KEY}"}}
]""")
    gateway = start_keyed_gateway(
        limits_etcd, state / "gateway.log", "--api-keys-file", str(keys_file), "--max-tokens-cap", str(FLAG_TOKENS)
    )
    try:
        gateway.serve_model(MODEL, limits_agent, PLAIN_KEY)
        gateway.agent = limits_agent
        yield gateway
    finally:
        stop_process(gateway.process)


@pytest.fixture(scope="module")
def limited_stub(limited: KeyedGateway) -> Iterator[gateway_pb2_grpc.GatewayStub]:
    with grpc.insecure_channel(limited.grpc_target) as channel:
        yield gateway_pb2_grpc.GatewayStub(channel)


def post(
    gateway: KeyedGateway, key: str | None, body: dict, request_id: str | None = None, path: str = "/v1/completions"
) -> httpx.Response:
    headers = bearer(key) if key else {}
    if request_id:
        headers["x-request-id"] = request_id
    return httpx.post(gateway.http_url + path, json=body, headers=headers, timeout=10)


def unique_id(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns()}"


def test_a_declared_body_over_the_limit_is_413_before_it_is_read(limited):
    request_id = unique_id("too-large")
    response = post(limited, TIGHT_KEY, completion(MODEL, "echo " + "x" * TIGHT_BYTES), request_id)
    error = assert_openai_error(response, 413, "request_too_large")
    assert str(TIGHT_BYTES) in error["message"]
    assert not limited.agent.received(request_id)
    # The same body is fine for a key with the default limit.
    assert post(limited, PLAIN_KEY, completion(MODEL, "echo " + "x" * TIGHT_BYTES)).status_code == 200


def test_a_chunked_body_without_a_length_is_counted_as_it_comes(limited):
    chunks = [b'{"model": "' + MODEL.encode() + b'", "prompt": "echo ', *[b"x" * 100] * 10, b'"}']

    def send(key: str) -> httpx.Response:
        return httpx.post(
            limited.http_url + "/v1/completions",
            content=iter(chunks),
            timeout=10,
            headers={**bearer(key), "content-type": "application/json", "x-request-id": rid},
        )

    rid = unique_id("chunked")
    response = send(TIGHT_KEY)
    assert "content-length" not in response.request.headers
    assert_openai_error(response, 413, "request_too_large")
    assert not limited.agent.received(rid)
    rid = unique_id("chunked-ok")
    assert send(PLAIN_KEY).status_code == 200


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", completion(MODEL, "echo " + "p" * TIGHT_CHARS), "prompt"),
        (
            "/v1/chat/completions",
            {
                "model": MODEL,
                "messages": [{"role": "system", "content": "s" * 30}, {"role": "user", "content": "echo " + "u" * 10}],
            },
            "messages",
        ),
    ],
)
def test_a_prompt_over_the_limit_is_400(limited, path, body, param):
    request_id = unique_id("long-prompt")
    error = assert_openai_error(post(limited, TIGHT_KEY, body, request_id, path), 400, "prompt_too_long", param)
    assert error["type"] == "invalid_request_error" and str(TIGHT_CHARS) in error["message"]
    assert not limited.agent.received(request_id)


@pytest.mark.parametrize("key, cap", [(TIGHT_KEY, TIGHT_TOKENS), (PLAIN_KEY, FLAG_TOKENS)])
def test_max_tokens_over_the_keys_cap_is_400(limited, key, cap):
    request_id = unique_id("max-tokens")
    error = assert_openai_error(
        post(limited, key, completion(MODEL, max_tokens=cap + 1), request_id), 400, "invalid_value", "max_tokens"
    )
    assert str(cap) in error["message"]
    assert not limited.agent.received(request_id)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "echo a"}], "max_completion_tokens": cap + 1}
    assert_openai_error(post(limited, key, chat, path="/v1/chat/completions"), 400, "invalid_value", "max_tokens")
    assert post(limited, key, completion(MODEL, max_tokens=cap)).status_code == 200


def test_grpc_limits(limited, limited_stub):
    def refused(request: generate_pb2.GenerateRequest) -> grpc.RpcError:
        with pytest.raises(grpc.RpcError) as caught:
            list(limited_stub.Generate(request, metadata=grpc_auth(TIGHT_KEY), timeout=5))
        assert not limited.agent.received(request.request_id)
        return caught.value

    too_many = refused(
        generate_pb2.GenerateRequest(
            request_id=unique_id("g-tokens"),
            model=MODEL,
            prompt="echo a",
            sampling=generate_pb2.SamplingParams(max_tokens=TIGHT_TOKENS + 1),
        )
    )
    assert too_many.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_tokens" in too_many.details()
    too_long = refused(
        generate_pb2.GenerateRequest(request_id=unique_id("g-prompt"), model=MODEL, prompt="echo " + "x" * TIGHT_CHARS)
    )
    assert too_long.code() == grpc.StatusCode.INVALID_ARGUMENT and "characters" in too_long.details()
    too_large = refused(
        generate_pb2.GenerateRequest(
            request_id=unique_id("g-large"),
            model=MODEL,
            prompt="echo a",
            sampling=generate_pb2.SamplingParams(stop=["s" * TIGHT_BYTES]),
        )
    )
    assert too_large.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and str(TIGHT_BYTES) in too_large.details()


def test_the_rate_limit_is_per_key_across_both_apis_with_retry_after(limited, limited_stub):
    assert httpx.get(limited.http_url + "/v1/models", headers=bearer(RATED_KEY)).status_code == 200
    limited_stub.ListModels(gateway_pb2.ListModelsRequest(), metadata=grpc_auth(RATED_KEY), timeout=5)
    request_id = unique_id("rated")
    response = post(limited, RATED_KEY, completion(MODEL), request_id)
    error = assert_openai_error(response, 429, "rate_limit_exceeded")
    assert error["type"] == "rate_limit_error"
    retry_after = int(response.headers["retry-after"])  # whole seconds: about 100 at 0.01 requests/s
    assert 1 <= retry_after <= 100 and f"retry in {retry_after}s" in error["message"]
    assert not limited.agent.received(request_id)
    with pytest.raises(grpc.RpcError) as caught:
        list(
            limited_stub.Generate(
                generate_pb2.GenerateRequest(model=MODEL, prompt="echo a"), metadata=grpc_auth(RATED_KEY), timeout=5
            )
        )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert 1 <= int(dict(caught.value.trailing_metadata())["retry-after"]) <= 100
    # Other keys have buckets of their own.
    assert post(limited, PLAIN_KEY, completion(MODEL)).status_code == 200


# ---- generations in flight ----------------------------------------------------------------------


def assert_no_slot(gateway: KeyedGateway, stub: gateway_pb2_grpc.GatewayStub, key: str | None) -> None:
    """Both APIs refuse another generation to `key` (429 / RESOURCE_EXHAUSTED): its one slot is taken."""
    request_id = unique_id("no-slot")
    error = assert_openai_error(post(gateway, key, completion(MODEL), request_id), 429, "too_many_concurrent_requests")
    assert error["type"] == "rate_limit_error"
    with pytest.raises(grpc.RpcError) as caught:
        list(
            stub.Generate(
                generate_pb2.GenerateRequest(request_id=request_id + "-g", model=MODEL, prompt="echo a"),
                metadata=grpc_auth(key) if key else (),
                timeout=5,
            )
        )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not gateway.agent.received(request_id) and not gateway.agent.received(request_id + "-g")


def slot_is_free(gateway: KeyedGateway, key: str | None) -> bool:
    return post(gateway, key, completion(MODEL)).status_code == 200


def leave_a_rest_stream_midway(gateway: KeyedGateway, stub, key: str | None) -> None:
    request_id = unique_id("leave")
    headers = {**(bearer(key) if key else {}), "x-request-id": request_id}
    with (
        httpx.Client(base_url=gateway.http_url) as http,
        http.stream(
            "POST", "/v1/completions", json=completion(MODEL, "slow 60", stream=True), headers=headers
        ) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()  # kept: a dropped line iterator closes the connection
        assert next(lines).startswith("data: ")
        assert_no_slot(gateway, stub, key)
    # Left mid-stream: the agent call is cancelled and the slot comes back.
    assert gateway.agent.call_for(request_id).ended.wait(5)
    wait_until(lambda: slot_is_free(gateway, key), "the slot of a left stream was never freed")


def test_a_rest_stream_left_midway_frees_its_slot(limited, limited_stub):
    leave_a_rest_stream_midway(limited, limited_stub, TIGHT_KEY)


def test_a_cancelled_grpc_call_frees_its_slot(limited, limited_stub):
    request_id = unique_id("grpc-cancel")
    call = limited_stub.Generate(
        generate_pb2.GenerateRequest(request_id=request_id, model=MODEL, prompt="slow 60"),
        metadata=grpc_auth(TIGHT_KEY),
        timeout=10,
    )
    next(call)
    assert_no_slot(limited, limited_stub, TIGHT_KEY)
    call.cancel()
    assert limited.agent.call_for(request_id).ended.wait(5)
    wait_until(lambda: slot_is_free(limited, TIGHT_KEY), "the slot of a cancelled gRPC call was never freed")


def test_a_rest_request_that_times_out_at_the_client_frees_its_slot(limited, limited_stub):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            limited.http_url + "/v1/completions", json=completion(MODEL, "hang"), headers=bearer(TIGHT_KEY), timeout=0.5
        )
    wait_until(lambda: slot_is_free(limited, TIGHT_KEY), "the slot of a request whose client left was never freed")


@pytest.mark.parametrize(
    "prompt, stream",
    [
        ("echo a b", True),
        ("echo a b", False),
        ("fail INVALID_ARGUMENT no", True),
        ("fail UNAVAILABLE no", False),
        ("fail-after 1 INTERNAL", True),
        ("fail-after 1 INTERNAL", False),
    ],
)
def test_every_ending_frees_the_slot_before_the_client_sees_it(limited, limited_stub, prompt, stream):
    # No waiting: the slot is free by the time the answer (or the stream's [DONE]) is sent.
    for _ in range(3):
        post(limited, TIGHT_KEY, completion(MODEL, prompt, stream=stream))
    assert post(limited, TIGHT_KEY, completion(MODEL)).status_code == 200
    for _ in range(3):
        try:
            list(
                limited_stub.Generate(
                    generate_pb2.GenerateRequest(model=MODEL, prompt=prompt), metadata=grpc_auth(TIGHT_KEY), timeout=5
                )
            )
        except grpc.RpcError:
            pass
    assert post(limited, TIGHT_KEY, completion(MODEL)).status_code == 200


def test_refusals_are_counted_by_reason(limited):
    samples = metric_values(httpx.get(limited.http_url + "/metrics").text)  # open: no --metrics-auth here

    def count(api: str, reason: str, key: str) -> float:
        return samples.get(f'prism_gateway_rejected_requests_total{{api="{api}",key="{key}",reason="{reason}"}}', 0)

    for api, reason, key in [
        ("rest", "too_large", "tight"),
        ("rest", "prompt_too_long", "tight"),
        ("rest", "max_tokens", "plain"),
        ("grpc", "max_tokens", "tight"),
        ("grpc", "too_large", "tight"),
        ("rest", "rate_limited", "rated"),
        ("grpc", "rate_limited", "rated"),
        ("rest", "too_many_streams", "tight"),
        ("grpc", "too_many_streams", "tight"),
    ]:
        assert count(api, reason, key) >= 1, (api, reason, key)


# ---- the same limits without keys: everyone is `anonymous` -----------------------------------------


@pytest.fixture(scope="module")
def anonymous_limited(tmp_path_factory, limits_etcd, limits_agent) -> Iterator[KeyedGateway]:
    state = tmp_path_factory.mktemp("anonymous-limited-gateway")
    gateway = start_keyed_gateway(
        limits_etcd,
        state / "gateway.log",
        "--max-tokens-cap",
        str(TIGHT_TOKENS),
        "--max-request-bytes",
        str(TIGHT_BYTES),
        "--max-concurrent-streams",
        "1",
    )
    try:
        gateway.serve_model(MODEL, limits_agent, None)
        gateway.agent = limits_agent
        yield gateway
    finally:
        stop_process(gateway.process)


def test_without_keys_the_limits_apply_to_the_anonymous_client(anonymous_limited):
    assert_openai_error(
        post(anonymous_limited, None, completion(MODEL, max_tokens=TIGHT_TOKENS + 1)),
        400,
        "invalid_value",
        "max_tokens",
    )
    assert_openai_error(
        post(anonymous_limited, None, completion(MODEL, "echo " + "x" * TIGHT_BYTES)), 413, "request_too_large"
    )
    assert post(anonymous_limited, None, completion(MODEL, max_tokens=TIGHT_TOKENS)).status_code == 200
    with grpc.insecure_channel(anonymous_limited.grpc_target) as channel:
        leave_a_rest_stream_midway(anonymous_limited, gateway_pb2_grpc.GatewayStub(channel), None)
    samples = metric_values(httpx.get(anonymous_limited.http_url + "/metrics").text)
    assert samples['prism_gateway_rejected_requests_total{api="rest",key="anonymous",reason="too_many_streams"}'] >= 1
