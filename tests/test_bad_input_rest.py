"""Bad input over REST, sent to the real gateway of the session's real local
cluster (conftest's `cluster`: etcd, scheduler, one agent with real tiny
engines): whatever comes in, the answer is never a 5xx and every 4xx
carries an OpenAI error body {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

MODELS = ("tiny-llama", "tiny-qwen2")
ROLES = ("system", "user", "assistant")
PATHS = ("/v1/completions", "/v1/chat/completions")
TIMEOUT_S = 60.0  # per request: far beyond any answer here, so reaching it is a hang


@pytest.fixture(scope="module")
def http(cluster) -> httpx.Client:
    with httpx.Client(base_url=cluster.http_url, timeout=TIMEOUT_S) as client:
        yield client


# ---- what every answer must look like ------------------------------------------------------------


def sse_events(text: str) -> list[Any]:
    """The data of each SSE event; "[DONE]" stays a string."""
    events = [block for block in text.split("\n\n") if block]
    assert all(e.startswith("data: ") for e in events), text[:500]
    return [e[6:] if e[6:] == "[DONE]" else json.loads(e[6:]) for e in events]


def assert_error_body(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    return error


def assert_answer(response: httpx.Response, *, valid: bool = False) -> None:
    """No 5xx; a 4xx has an OpenAI error body; a 200 is a whole response
    (a stream ends with [DONE] and carries no error event). `valid`: the
    request was valid, so it must have succeeded."""
    status = response.status_code
    assert status < 500, f"{status}: {response.text[:1000]}"
    if status >= 400:
        error = assert_error_body(response)
        assert not valid, f"a valid request failed with {status}: {error}"
        return
    assert status == 200, response.text[:500]
    if response.headers["content-type"].startswith("text/event-stream"):
        events = sse_events(response.text)
        assert events[-1] == "[DONE]", events[-3:]
        assert not any("error" in e for e in events[:-1]), events
        finishes = [c["finish_reason"] for e in events[:-1] for c in e["choices"] if c["finish_reason"]]
        assert finishes in (["stop"], ["length"]), events
    else:
        body = response.json()
        assert body["choices"][0]["finish_reason"] in ("stop", "length"), body
        assert body["usage"]["completion_tokens"] >= 0


def post_json(http: httpx.Client, path: str, body: Any) -> httpx.Response:
    """`body` as a client would write it: NaN and Infinity as Python's json
    writes them, unpaired surrogates as \\uXXXX escapes."""
    return http.post(path, content=json.dumps(body, allow_nan=True).encode(),
                     headers={"content-type": "application/json"})



@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path, fields, param", [
    ("/v1/completions", {"prompt": "\ud800"}, "prompt"),
    ("/v1/completions", {"prompt": ["a\udfffb"]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stop": "\udc80"}, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop": ["ok", "\ud800"]}, "stop"),
    ("/v1/completions", {"model": "tiny\ud800", "prompt": "hi"}, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\udfff"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "ok"},
                                           {"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     "messages[1].content"),
])
def test_unpaired_surrogates_are_400(http, path, fields, param, stream):
    """JSON may escape half a surrogate pair alone; such text is not Unicode and cannot become a
    protobuf string. It was a 500 ("'utf-8' codec can't encode character '\\ud800'")."""
    response = post_json(http, path, {"model": MODELS[0], "max_tokens": 1, "stream": stream, **fields})
    assert response.status_code == 400, response.text
    error = assert_error_body(response)
    assert error["param"] == param and "unpaired surrogate" in error["message"], error


def greedy_text(http: httpx.Client, path: str, **sampling: Any) -> str:
    body = {"model": MODELS[0], "max_tokens": 4, "ignore_eos": True, **sampling}
    if path == "/v1/completions":
        body["prompt"] = "The capital of France is"
    else:
        body["messages"] = [{"role": "user", "content": "The capital of France is"}]
    response = post_json(http, path, body)
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    return choice["text"] if path == "/v1/completions" else choice["message"]["content"]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("temperature", [1e-45, 1e-40, 1e-6])
def test_a_tiny_temperature_decodes_greedily(http, path, temperature):
    """temperature 1e-45 was a 500 ("probability tensor contains either `inf`, `nan` or element < 0"
    from the engine, which failed every request in the same step with it)."""
    assert greedy_text(http, path, temperature=temperature) == greedy_text(http, path, temperature=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("top_p", [5e-324, 1e-300, 1e-46])
def test_a_top_p_below_the_smallest_float32_keeps_the_likeliest_token(http, path, top_p):
    """A valid top_p (in (0, 1]) too small for a protobuf float rounded to 0 on the way to the agent
    and came back 400 "top_p must be in (0, 1], got 0". It keeps only the most likely token now."""
    assert greedy_text(http, path, temperature=1.0, top_p=top_p) == greedy_text(http, path, temperature=0)
