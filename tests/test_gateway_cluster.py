"""The REST gateway on the real local cluster (the session's `cluster`
fixture: etcd, scheduler, one agent with real engines serving tiny-llama
and tiny-qwen2), through the official openai client and httpx."""

from __future__ import annotations

import json
import time
import uuid

import httpx
import openai
import pytest

MODELS = ("tiny-llama", "tiny-qwen2")


@pytest.fixture()
def oai(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.http_url + "/v1", api_key="x", max_retries=0, timeout=120)


def test_models_are_listed_as_available(oai, cluster):
    listed = httpx.get(cluster.http_url + "/v1/models").json()["data"]
    by_id = {m["id"]: m for m in listed}
    for name in MODELS:
        assert by_id[name]["available"] and by_id[name]["max_context"] > 0
    assert set(MODELS) <= {m.id for m in oai.models.list()}


@pytest.mark.parametrize("model", MODELS)
def test_greedy_completion_equals_its_stream(oai, model):
    args = dict(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    done = oai.completions.create(**args)
    chunks = list(oai.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert done.choices[0].finish_reason == "length"
    assert done.usage.completion_tokens == 8 and done.usage.prompt_tokens > 0
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8


def test_chat_completion_and_stream(oai):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    done = oai.chat.completions.create(
        model="tiny-qwen2", messages=messages, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert done.id.startswith("chatcmpl-") and done.choices[0].message.role == "assistant"
    assert done.usage.completion_tokens == 6
    chunks = list(
        oai.chat.completions.create(
            model="tiny-qwen2",
            messages=messages,
            max_completion_tokens=6,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == done.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_seeded_sampling_is_reproducible(oai):
    args = dict(
        model="tiny-llama", prompt="Hello", max_tokens=8, temperature=1.0, seed=7, extra_body={"ignore_eos": True}
    )
    assert oai.completions.create(**args).choices[0].text == oai.completions.create(**args).choices[0].text


def test_prompt_over_the_context_is_400(oai, cluster):
    max_context = {m["id"]: m["max_context"] for m in httpx.get(cluster.http_url + "/v1/models").json()["data"]}
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model="tiny-llama", prompt="hello " * (max_context["tiny-llama"] + 16), max_tokens=1)
    assert "context" in caught.value.body["message"]
    # The same over a stream: the error comes before any output, so it is a real status.
    response = httpx.post(
        cluster.http_url + "/v1/completions",
        timeout=60,
        json={"model": "tiny-llama", "prompt": "hello " * (max_context["tiny-llama"] + 16), "stream": True},
    )
    assert response.status_code == 400 and "context" in response.json()["error"]["message"]


def test_unknown_model_is_404(oai):
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "Hi"}])


def test_the_request_id_reaches_the_agent_log(cluster):
    request_id = f"trace-{uuid.uuid4().hex}"
    response = httpx.post(
        cluster.http_url + "/v1/completions",
        headers={"X-Request-Id": request_id},
        timeout=60,
        json={"model": "tiny-llama", "prompt": "Hi", "max_tokens": 2},
    )
    assert response.status_code == 200 and response.json()["id"] == request_id
    deadline = time.monotonic() + 5
    while request_id not in cluster.log_tail("agent", 500):
        assert time.monotonic() < deadline, "the agent never logged the gateway's request id"
        time.sleep(0.1)


def test_the_agent_logs_its_host_checks(cluster):
    """prism doctor's host checks (services/gpu_agent/host_checks.py), at the agent's start."""
    log = (cluster.log_dir / "agent.log").read_text()
    assert "host check: OK    python" in log and "host check: OK    torch" in log
    assert "host check: SKIP  gpus" in log  # a CPU agent


def test_raw_sse_stream_ends_with_done(cluster):
    with httpx.stream(
        "POST",
        cluster.http_url + "/v1/chat/completions",
        timeout=60,
        json={"model": "tiny-llama", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True},
    ) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][len("data: ") :])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"
