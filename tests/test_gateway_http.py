"""The gateway's REST API, end to end but without the engine: a real etcd,
the gateway as a subprocess and scripted fake agents (see
test_gateway_support.py). Checked through raw httpx and the official
openai client."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from test_gateway_support import (  # its fixtures come as a plugin (tests/conftest.py)
    # noqa: F401 - fixtures,
    REQUEST_TIMEOUT_S,
    FakeAgent,
    GatewayStack,
)

from prism_client.v1 import agent_pb2
from services.common import records
from services.common.etcd_server import free_port
from tests.prometheus_text import metric_values


@pytest.fixture()
def http(gateway_stack: GatewayStack) -> httpx.Client:
    with httpx.Client(base_url=gateway_stack.http_url, timeout=10) as client:
        yield client


@pytest.fixture()
def oai(gateway_stack: GatewayStack) -> openai.OpenAI:
    # No retries: a 503 or 429 must reach the test as it was answered.
    return openai.OpenAI(base_url=gateway_stack.http_url + "/v1", api_key="x", max_retries=0)


def sse_payloads(text: str) -> list:
    """The data of each SSE event; "[DONE]" stays a string."""
    events = [block for block in text.split("\n\n") if block]
    assert all(e.startswith("data: ") for e in events), events
    return [e[6:] if e[6:] == "[DONE]" else json.loads(e[6:]) for e in events]


def assert_error(response: httpx.Response, status: int, *, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["request_id"] == response.headers["x-request-id"]
    if param is not None:
        assert error["param"] == param, error
        assert param in error["message"]
    return error


# ---- health, metrics, models ------------------------------------------------


def test_health_is_ok_once_loaded(http):
    response = http.get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_models_lists_every_model_with_availability(gateway_stack, http, fake_agent):
    gateway_stack.serve_model("listed-live", [fake_agent], max_context=321)
    gateway_stack.serve_model("listed-loading", {"loader": fake_agent.address}, state="loading")
    body = http.get("/v1/models").json()
    assert body["object"] == "list"
    models = {m["id"]: m for m in body["data"]}
    assert models["listed-live"] | {"created": 0} == {
        "id": "listed-live",
        "object": "model",
        "created": 0,
        "owned_by": "prism",
        "available": True,
        "max_context": 321,
    }
    assert models["listed-loading"]["available"] is False
    assert isinstance(models["listed-live"]["created"], int)


def test_models_through_the_openai_client(gateway_stack, oai, echo_model):
    assert echo_model in {m.id for m in oai.models.list()}
    model = oai.models.retrieve(echo_model)
    assert (model.id, model.owned_by) == (echo_model, "prism")
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("no-such-model")


def test_a_removed_model_disappears(gateway_stack, fake_agent):
    gateway_stack.serve_model("short-lived", [fake_agent])
    gateway_stack.etcd.delete(records.MODELS + "short-lived")
    gateway_stack.wait_for_absence("short-lived")


def test_unknown_paths_get_openai_style_errors(http):
    assert_error(http.get("/v1/nothing-here"), 404)


# ---- routing failures --------------------------------------------------------


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"prompt": "echo hi"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "echo hi"}]}),
        ("/v1/completions", {"prompt": "echo hi", "stream": True}),
    ],
)
def test_unknown_model_is_404(http, path, body):
    error = assert_error(http.post(path, json={"model": "no-such-model", **body}), 404, param="model")
    assert (error["type"], error["code"]) == ("invalid_request_error", "model_not_found")
    assert "no-such-model" in error["message"]


def test_unknown_model_through_the_openai_client(oai):
    with pytest.raises(openai.NotFoundError) as caught:
        oai.completions.create(model="no-such-model", prompt="hi")
    assert caught.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}], stream=True)


@pytest.mark.parametrize("stream", [False, True])
def test_agent_where_nothing_listens_is_503_at_once(gateway_stack, http, stream):
    gateway_stack.serve_model("dead-agent-model", {"dead-agent": f"127.0.0.1:{free_port()}"})
    start = time.monotonic()
    response = http.post("/v1/completions", json={"model": "dead-agent-model", "prompt": "hi", "stream": stream})
    assert time.monotonic() - start < 1.5
    error = assert_error(response, 503)
    assert "has no live replica" in error["message"] and "dead-agent-model" in error["message"]


def test_dead_agent_through_the_openai_client(gateway_stack, oai):
    gateway_stack.serve_model("dead-agent-model-2", {"dead-agent-2": f"127.0.0.1:{free_port()}"})
    with pytest.raises(openai.InternalServerError) as caught:
        oai.chat.completions.create(model="dead-agent-model-2", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 503


# A model with no servable engine is waited for (test_gateway_cold_start.py); these never get one.


def test_model_whose_engine_stays_loading_is_503(gateway_stack, http, fake_agent):
    gateway_stack.serve_model("still-loading", {"loading-agent": fake_agent.address}, state="loading")
    error = assert_error(http.post("/v1/completions", json={"model": "still-loading", "prompt": "echo hi"}), 503)
    assert "did not become available" in error["message"] and "loading" in error["message"]


def test_model_whose_agent_vanished_is_503(gateway_stack, http, fake_agent):
    gateway_stack.serve_model("orphaned", {"vanishing-agent": fake_agent.address})
    gateway_stack.etcd.delete(records.AGENTS + "vanishing-agent")
    gateway_stack.wait_for_model("orphaned", available=False)
    error = assert_error(http.post("/v1/completions", json={"model": "orphaned", "prompt": "echo hi"}), 503)
    assert "did not become available" in error["message"] and "vanishing-agent is not registered" in error["message"]


def test_a_dead_replica_is_skipped_for_a_live_one(gateway_stack, http, fake_agent):
    gateway_stack.serve_model("half-dead", {"a-dead": f"127.0.0.1:{free_port()}", "b-live": fake_agent.address})
    for _ in range(4):  # round robin starts at each replica in turn; all must succeed
        response = http.post("/v1/completions", json={"model": "half-dead", "prompt": "echo ok"})
        assert response.status_code == 200, response.text


def test_requests_spread_over_replicas_and_a_repeated_prompt_keeps_its_replica(gateway_stack, http):
    # Prefix affinity (services/common/routing.py): one prompt's requests go to one replica (its prefix
    # cache holds it) while that one is not loaded past the others; other prompts spread.
    agents = [FakeAgent(), FakeAgent()]
    try:
        gateway_stack.serve_model("two-replicas", agents)
        for _ in range(6):
            assert http.post("/v1/completions", json={"model": "two-replicas", "prompt": "echo x"}).status_code == 200
        assert sorted(len(a.calls) for a in agents) == [0, 6]
        for i in range(40):
            assert (
                http.post("/v1/completions", json={"model": "two-replicas", "prompt": f"echo {i}"}).status_code == 200
            )
        assert min(len(a.calls) for a in agents) >= 10, [len(a.calls) for a in agents]
    finally:
        for agent in agents:
            agent.stop()


def test_an_agent_restarted_at_the_same_address_is_reached_again(gateway_stack, http):
    agent = FakeAgent()
    gateway_stack.serve_model("restarting", {"restarting-agent": agent.address})
    assert http.post("/v1/completions", json={"model": "restarting", "prompt": "echo x"}).status_code == 200
    agent.stop()
    assert http.post("/v1/completions", json={"model": "restarting", "prompt": "echo x"}).status_code == 503
    agent = FakeAgent(port=agent.port)
    try:
        deadline = time.monotonic() + 3  # the gateway's reconnect backoff is capped at a second
        while http.post("/v1/completions", json={"model": "restarting", "prompt": "echo x"}).status_code != 200:
            assert time.monotonic() < deadline, "the gateway did not reconnect to the restarted agent"
            time.sleep(0.1)
    finally:
        agent.stop()


# ---- validation ------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": -3}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": "16"}, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 1.5}, "max_tokens"),
        ({"prompt": "hi", "temperature": 2.5}, "temperature"),
        ({"prompt": "hi", "temperature": -0.1}, "temperature"),
        ({"prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "top_p": 1.01}, "top_p"),
        ({"prompt": "hi", "n": 2}, "n"),
        ({"prompt": "hi", "seed": "x"}, "seed"),
        ({"prompt": "hi", "stop": 5}, "stop"),
        ({"prompt": "hi", "stream": "yes"}, "stream"),
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else v,
)
def test_invalid_completion_requests_are_400(http, echo_model, body, param):
    error = assert_error(http.post("/v1/completions", json={"model": echo_model, **body}), 400, param=param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": []}, "messages"),
        ({}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "user"}]}, "messages[1].content"),
        ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}, "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_p": -1}, "top_p"),
    ],
    ids=lambda v: json.dumps(v) if isinstance(v, dict) else v,
)
def test_invalid_chat_requests_are_400(http, echo_model, body, param):
    assert_error(http.post("/v1/chat/completions", json={"model": echo_model, **body}), 400, param=param)


def test_missing_model_is_400(http):
    assert_error(http.post("/v1/completions", json={"prompt": "hi"}), 400, param="model")


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b""])
def test_malformed_bodies_are_400(http, content):
    response = http.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
    error = assert_error(response, 400)
    assert "JSON" in error["message"]


def test_invalid_requests_through_the_openai_client(oai, echo_model):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model=echo_model, prompt="hi", temperature=3)
    assert caught.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=echo_model, messages=[])


# ---- generation ------------------------------------------------------------------


def test_completion(http, fake_agent, echo_model):
    response = http.post("/v1/completions", json={"model": echo_model, "prompt": "echo a b c", "unknown": {"x": 1}})
    assert response.status_code == 200, response.text
    body = response.json()
    request_id = response.headers["x-request-id"]
    assert body["id"] == request_id and request_id.startswith("cmpl-")
    assert (body["object"], body["model"]) == ("text_completion", echo_model)
    assert body["choices"] == [{"index": 0, "text": "a b c ", "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {
        "prompt_tokens": 4,
        "completion_tokens": 3,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    call = fake_agent.call_for(request_id)
    assert call.request.prompt == "echo a b c" and call.request.model == echo_model
    assert call.request.sampling.max_tokens == 16  # OpenAI's completions default
    assert call.metadata["x-request-id"] == request_id


def test_max_tokens_cuts_with_length(http, echo_model):
    body = http.post("/v1/completions", json={"model": echo_model, "prompt": "echo a b c d", "max_tokens": 2}).json()
    assert body["choices"][0] | {"index": 0} == {
        "index": 0,
        "text": "a b ",
        "logprobs": None,
        "finish_reason": "length",
    }


def test_sampling_parameters_reach_the_agent(http, fake_agent, echo_model):
    response = http.post(
        "/v1/completions",
        json={
            "model": echo_model,
            "prompt": ["echo x"],
            "max_tokens": 5,
            "temperature": 0,
            "top_p": 0.5,
            "seed": 42,
            "stop": "\n",
            "ignore_eos": True,
            "n": 1,
            "logprobs": None,
        },
    )
    assert response.status_code == 200, response.text
    sampling = fake_agent.call_for(response.json()["id"]).request.sampling
    assert sampling.HasField("temperature") and sampling.temperature == 0.0
    assert (sampling.max_tokens, sampling.top_p, sampling.seed) == (5, 0.5, 42)
    assert list(sampling.stop) == ["\n"] and sampling.ignore_eos


def test_unset_sampling_stays_unset(http, fake_agent, echo_model):
    response = http.post(
        "/v1/chat/completions", json={"model": echo_model, "messages": [{"role": "user", "content": "echo x"}]}
    )
    sampling = fake_agent.call_for(response.json()["id"]).request.sampling
    for name in ("max_tokens", "temperature", "top_p", "seed"):
        assert not sampling.HasField(name), name


def test_client_request_id_is_used_throughout(http, fake_agent, echo_model):
    response = http.post(
        "/v1/completions", json={"model": echo_model, "prompt": "echo x"}, headers={"X-Request-Id": "client-chosen-17"}
    )
    assert response.headers["x-request-id"] == "client-chosen-17" == response.json()["id"]
    assert fake_agent.call_for("client-chosen-17").metadata["x-request-id"] == "client-chosen-17"
    error = http.post("/v1/completions", json={"model": "nope", "prompt": "x"}, headers={"X-Request-Id": "err-1"})
    assert error.json()["error"]["request_id"] == "err-1"


def test_chat_is_sent_as_chat_messages(http, fake_agent, echo_model):
    response = http.post(
        "/v1/chat/completions",
        json={
            "model": echo_model,
            "max_tokens": 50,
            "max_completion_tokens": 2,
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "echo"}, {"type": "text", "text": "p q r"}]},
            ],
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "p q "}, "logprobs": None, "finish_reason": "length"}
    ]
    request = fake_agent.call_for(body["id"]).request
    assert request.WhichOneof("input") == "chat"
    assert [(m.role, m.content) for m in request.chat.messages] == [("system", "be brief"), ("user", "echo\np q r")]
    assert request.sampling.max_tokens == 2  # max_completion_tokens wins


def test_completion_stream(http, echo_model):
    response = http.post(
        "/v1/completions",
        json={"model": echo_model, "prompt": "echo a b c", "stream": True, "stream_options": {"include_usage": True}},
    )
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_payloads(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["id"] == response.headers["x-request-id"] and c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "a b c "
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


def test_stream_without_include_usage_has_no_usage_chunk(http, echo_model):
    response = http.post("/v1/completions", json={"model": echo_model, "prompt": "echo a", "stream": True})
    assert all("usage" not in c for c in sse_payloads(response.text)[:-1])


def test_openai_client_completions(oai, echo_model):
    done = oai.completions.create(model=echo_model, prompt="echo hello world", max_tokens=5, temperature=0)
    assert done.choices[0].text == "hello world " and done.choices[0].finish_reason == "stop"
    assert done.usage.completion_tokens == 2
    chunks = list(oai.completions.create(model=echo_model, prompt="echo hello world", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "hello world "


def test_openai_client_chat(oai, echo_model):
    done = oai.chat.completions.create(model=echo_model, messages=[{"role": "user", "content": "echo hi there"}])
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content == "hi there "
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    chunks = list(
        oai.chat.completions.create(
            model=echo_model,
            messages=[{"role": "user", "content": "echo hi there"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "hi there "
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == 2 and chunks[-1].id == chunks[0].id


# ---- agent failures ----------------------------------------------------------------


@pytest.mark.parametrize(
    "code, status",
    [
        # An agent's NOT_FOUND is a replica that no longer has the model (the gateway knows the model: an
        # unknown one is refused before any agent is asked), so with no other replica: 503.
        ("INVALID_ARGUMENT", 400),
        ("NOT_FOUND", 503),
        ("RESOURCE_EXHAUSTED", 429),
        ("UNAVAILABLE", 503),
        ("DEADLINE_EXCEEDED", 504),
        ("INTERNAL", 500),
        ("UNKNOWN", 500),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_agent_errors_map_to_http_statuses(http, echo_model, code, status, stream):
    response = http.post(
        "/v1/completions", json={"model": echo_model, "prompt": f"fail {code} prompt has 999 tokens", "stream": stream}
    )
    error = assert_error(response, status)
    if status == 400:
        assert "prompt has 999 tokens" in error["message"]
    if status == 500:
        assert response.headers["x-request-id"] in error["message"]


def test_error_statuses_through_the_openai_client(oai, echo_model):
    with pytest.raises(openai.RateLimitError):
        oai.completions.create(model=echo_model, prompt="fail RESOURCE_EXHAUSTED busy")
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(
            model=echo_model, messages=[{"role": "user", "content": "fail INVALID_ARGUMENT x"}], stream=True
        )


def test_an_error_after_the_stream_began_is_an_sse_event(http, echo_model):
    response = http.post(
        "/v1/chat/completions",
        json={"model": echo_model, "messages": [{"role": "user", "content": "fail-after 2 INTERNAL"}], "stream": True},
    )
    assert response.status_code == 200
    events = sse_payloads(response.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["request_id"] == response.headers["x-request-id"]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2]) == "t t "


def test_the_openai_client_raises_on_a_mid_stream_error(oai, echo_model):
    with pytest.raises(openai.APIError):
        for _ in oai.completions.create(model=echo_model, prompt="fail-after 1 INTERNAL", stream=True):
            pass


def test_an_error_after_output_still_fails_a_non_stream_request(http, echo_model):
    assert_error(http.post("/v1/completions", json={"model": echo_model, "prompt": "fail-after 2 UNAVAILABLE"}), 503)


@pytest.mark.parametrize("script", ["eof", "no-finish"])
def test_a_broken_agent_stream_is_500(http, echo_model, script):
    error = assert_error(http.post("/v1/completions", json={"model": echo_model, "prompt": script}), 500)
    assert "request" in error["message"]


def test_a_hung_agent_times_out_with_504(http, fake_agent, echo_model):
    start = time.monotonic()
    response = http.post("/v1/completions", json={"model": echo_model, "prompt": "hang"})
    assert REQUEST_TIMEOUT_S - 0.5 < time.monotonic() - start < REQUEST_TIMEOUT_S + 2
    assert_error(response, 504)
    assert fake_agent.call_for(response.headers["x-request-id"]).ended.wait(5)


# ---- client disconnects ---------------------------------------------------------


def test_leaving_a_stream_cancels_the_agent_call(gateway_stack, fake_agent, echo_model):
    with (
        httpx.Client(base_url=gateway_stack.http_url) as http,
        http.stream(
            "POST",
            "/v1/completions",
            json={"model": echo_model, "prompt": "slow 60", "stream": True},
            headers={"x-request-id": "leave-stream"},
        ) as response,
    ):
        assert next(response.iter_lines()).startswith("data: ")
    call = fake_agent.call_for("leave-stream")
    assert call.ended.wait(2) and call.cancelled


@pytest.mark.parametrize("script", ["slow 60", "hang"])
def test_leaving_a_non_stream_request_cancels_the_agent_call(gateway_stack, fake_agent, echo_model, script):
    request_id = f"leave-{script.replace(' ', '-')}"
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            gateway_stack.http_url + "/v1/completions",
            json={"model": echo_model, "prompt": script},
            headers={"x-request-id": request_id},
            timeout=0.4,
        )
    call = fake_agent.wait_for_call(request_id)
    # Well before the gateway's own deadline would end it.
    assert call.ended.wait(1.0) and call.cancelled


# ---- metrics ---------------------------------------------------------------------


def test_metrics_count_requests_tokens_and_latency(http, echo_model):
    assert http.post("/v1/completions", json={"model": echo_model, "prompt": "echo a b"}).status_code == 200
    http.post("/v1/completions", json={"model": "never-heard-of", "prompt": "x"})
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    labels = f'api="completions",model="{echo_model}"'
    assert f'prism_gateway_requests_total{{api="completions",code="200",model="{echo_model}"}}' in text
    assert 'prism_gateway_requests_total{api="completions",code="404",model="unknown"}' in text
    assert "never-heard-of" not in text
    assert f"prism_gateway_generated_tokens_total{{{labels}}}" in text
    assert f"prism_gateway_time_to_first_token_seconds_count{{{labels}}}" in text
    assert f"prism_gateway_request_duration_seconds_count{{{labels}}}" in text
    assert f"prism_gateway_requests_in_flight{{{labels}}} 0.0" in text


def reporting_agent_status(agent_id: str, model: str) -> agent_pb2.AgentStatus:
    """What a busy agent with one engine on device 0 (and one of a model the cluster does not know) reports."""
    mib = 1 << 20
    status = agent_pb2.AgentStatus(
        agent_id=agent_id,
        gpus=[
            agent_pb2.GpuMemory(
                gpu_id=0,
                total_bytes=8000 * mib,
                weight_bytes=1000 * mib,
                reserve_bytes=500 * mib,
                kv_budget_bytes=6500 * mib,
                kv_limit_bytes=2000 * mib,
                kv_mapped_bytes=1500 * mib,
                free_bytes=4500 * mib,
                engines=[
                    agent_pb2.EngineMemory(model=model, active=True, weight_bytes=1000 * mib, kv_limit_bytes=2000 * mib)
                ],
            )
        ],
    )
    status.engines.add(
        model=model,
        gpu_ids=[0],
        state=agent_pb2.ENGINE_STATE_ACTIVE,
        memory_limit_bytes=2000 * mib,
        kv_mapped_bytes=1500 * mib,
        kv_used_bytes=1200 * mib,
        kv_demand_bytes=1800 * mib,
        weight_bytes=1000 * mib,
        queued_requests=2,
        admission_queued=3,
        running_requests=4,
        priority=2,
        serving=agent_pb2.ServingStats(
            window_s=60,
            arrival_rate=1.5,
            finished_requests=80,
            ttft_p50_ms=120,
            ttft_p99_ms=900,
            tpot_p50_ms=20,
            tpot_p99_ms=45,
            slo_attainment=0.75,
            shed_requests=5,
            failed_requests=1,
        ),
    )
    status.engines.add(model="not-in-the-registry", gpu_ids=[0], state=agent_pb2.ENGINE_STATE_ACTIVE)
    return status


def scrape_until(http, sample: str, timeout_s: float = 10.0) -> dict[str, float]:
    """/metrics once it has `sample` (the gateway sees new agents through its etcd watch)."""
    deadline = time.monotonic() + timeout_s
    while True:
        response = http.get("/metrics")
        assert response.status_code == 200, response.text
        samples = metric_values(response.text)
        if sample in samples:
            return samples
        assert time.monotonic() < deadline, f"{sample} never appeared in /metrics:\n{response.text}"
        time.sleep(0.05)


def test_metrics_carry_each_agents_status(gateway_stack, http):
    agent = FakeAgent()
    try:
        agent_id = f"fake-{agent.port}"
        agent.status = reporting_agent_status(agent_id, "metered")
        gateway_stack.serve_model("metered", [agent])
        samples = scrape_until(http, f'prism_agent_up{{agent="{agent_id}"}}')
    finally:
        agent.stop()
    mib = 1 << 20
    assert samples[f'prism_agent_up{{agent="{agent_id}"}}'] == 1
    gpu = f'agent="{agent_id}",gpu="0"'
    assert samples[f"prism_agent_gpu_total_bytes{{{gpu}}}"] == 8000 * mib
    assert samples[f"prism_agent_gpu_weight_bytes{{{gpu}}}"] == 1000 * mib
    assert samples[f"prism_agent_gpu_kv_budget_bytes{{{gpu}}}"] == 6500 * mib
    assert samples[f"prism_agent_gpu_free_bytes{{{gpu}}}"] == 4500 * mib
    engine = f'agent="{agent_id}",gpu="0",model="metered"'
    assert samples[f"prism_agent_engine_kv_limit_bytes{{{engine}}}"] == 2000 * mib
    assert samples[f"prism_agent_engine_kv_mapped_bytes{{{engine}}}"] == 1500 * mib
    assert samples[f"prism_agent_engine_kv_used_bytes{{{engine}}}"] == 1200 * mib
    assert samples[f"prism_agent_engine_kv_demand_bytes{{{engine}}}"] == 1800 * mib
    assert samples[f"prism_agent_engine_weight_bytes{{{engine}}}"] == 1000 * mib
    assert samples[f"prism_agent_engine_queued_requests{{{engine}}}"] == 2
    assert samples[f"prism_agent_engine_admission_queued_requests{{{engine}}}"] == 3
    assert samples[f"prism_agent_engine_running_requests{{{engine}}}"] == 4
    assert samples[f"prism_agent_engine_priority{{{engine}}}"] == 2
    assert samples[f'prism_agent_engine_state{{{engine},state="active"}}'] == 1
    assert samples[f"prism_agent_model_arrival_rate{{{engine}}}"] == 1.5
    assert samples[f"prism_agent_model_slo_attainment{{{engine}}}"] == 0.75
    assert samples[f"prism_agent_model_finished_requests{{{engine}}}"] == 80
    assert samples[f"prism_agent_model_shed_requests{{{engine}}}"] == 5
    assert samples[f"prism_agent_model_failed_requests{{{engine}}}"] == 1
    assert samples[f'prism_agent_model_ttft_seconds{{{engine},quantile="0.5"}}'] == pytest.approx(0.12)
    assert samples[f'prism_agent_model_ttft_seconds{{{engine},quantile="0.99"}}'] == pytest.approx(0.9)
    assert samples[f'prism_agent_model_tpot_seconds{{{engine},quantile="0.99"}}'] == pytest.approx(0.045)
    # An engine of a model the cluster does not have adds no series (label values stay bounded).
    assert not any("not-in-the-registry" in name for name in samples)


def test_agents_that_do_not_answer_do_not_fail_the_scrape(gateway_stack, http, fake_agent):
    # One agent is registered but nothing listens at its address; the fake agent answers UNIMPLEMENTED.
    gateway_stack.etcd.put(
        records.AGENTS + "gone", records.AgentRecord(agent_id="gone", address=f"127.0.0.1:{free_port()}").to_json()
    )
    gateway_stack.serve_model("silent", [fake_agent])
    silent = f"fake-{fake_agent.port}"
    samples = scrape_until(http, 'prism_agent_up{agent="gone"}')
    samples = scrape_until(http, f'prism_agent_up{{agent="{silent}"}}')  # a second scrape: errors add up
    assert samples['prism_agent_up{agent="gone"}'] == 0
    assert samples[f'prism_agent_up{{agent="{silent}"}}'] == 0
    assert samples['prism_gateway_agent_scrape_errors_total{agent="gone"}'] >= 2
    assert samples[f'prism_gateway_agent_scrape_errors_total{{agent="{silent}"}}'] >= 1
    assert not any(name.startswith("prism_agent_engine") and "silent" in name for name in samples)
    gateway_stack.etcd.delete(records.AGENTS + "gone")


def test_generate_request_ids_are_unique(http, echo_model):
    ids = {http.post("/v1/completions", json={"model": echo_model, "prompt": "echo x"}).json()["id"] for _ in range(3)}
    assert len(ids) == 3
