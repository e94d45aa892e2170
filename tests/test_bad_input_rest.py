"""Bad input over REST, proven with hypothesis: arbitrary and near-valid JSON
bodies, raw bytes and wrong content types for /v1/completions and
/v1/chat/completions (streamed and not), sent to the real gateway of the
session's real local cluster (conftest's `cluster`: etcd, scheduler, one
agent with real tiny engines).

Whatever comes in, the answer is never a 5xx (the cluster is ready, so not
even 503), every 4xx carries an OpenAI error body {"error": {"message",
"type", "param", "code"}}, a valid request completes, and every process of
the cluster is still alive with /health 200 at the end.

Examples are derandomized (the same every run) and kept cheap: max_tokens
is tiny wherever a request can be valid, so a run costs seconds."""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MODELS = ("tiny-llama", "tiny-qwen2")
ROLES = ("system", "user", "assistant")
PATHS = ("/v1/completions", "/v1/chat/completions")
TIMEOUT_S = 60.0  # per request: far beyond any answer here, so reaching it is a hang

SETTINGS = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


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
    return http.post(
        path, content=json.dumps(body, allow_nan=True).encode(), headers={"content-type": "application/json"}
    )


# ---- strategies ---------------------------------------------------------------------------------

# Strings hypothesis would not make on its own: unpaired surrogates (valid JSON escapes, invalid
# Unicode), NUL, bidi and zero-width marks, a long one.
odd_strings = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "\ud800",
        "a\udfffb",
        "\udc80\ud800",
        "\u202e\u200b",
        "\ufeff",
        "💥" * 40,
        "x" * 5000,
        "<|endoftext|>",
        "{{ raise_exception('x') }}",
    ]
)
text = st.one_of(st.text(max_size=40), odd_strings)
ODD_INTS = [
    0,
    -1,
    1,
    2,
    3,
    255,
    256,
    -(2**31),
    2**31 - 1,
    2**31,
    2**32,
    -(2**63),
    2**63 - 1,
    2**63,
    2**64,
    10**30,
    -(10**30),
]
ODD_FLOATS = [
    0.0,
    -0.0,
    0.5,
    1.0,
    2.0,
    2.0000001,
    1e-45,
    1e-40,
    5e-324,
    1e-5,
    1e308,
    -1e308,
    math.nan,
    math.inf,
    -math.inf,
]
odd_ints, odd_floats = st.sampled_from(ODD_INTS), st.sampled_from(ODD_FLOATS)
odd_numbers = st.one_of(odd_ints, odd_floats, st.booleans())
numbers = st.one_of(odd_numbers, st.integers(), st.floats(allow_nan=True, allow_infinity=True))
scalars = st.one_of(st.none(), st.booleans(), numbers, text)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)),
    max_leaves=12,
)

# Every field either endpoint reads, and some OpenAI fields Prism ignores.
READ_FIELDS = (
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "n",
    "ignore_eos",
)
IGNORED_FIELDS = (
    "logprobs",
    "top_logprobs",
    "echo",
    "best_of",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "user",
    "response_format",
    "tools",
    "suffix",
)


def field_values(name: str) -> st.SearchStrategy[Any]:
    """Values near the field's valid ones and far from them."""
    near = {
        "model": st.one_of(
            st.sampled_from(MODELS),
            st.sampled_from([m.upper() for m in MODELS]),
            st.just("tiny-llama\x00"),
            st.just("../tiny-llama"),
            odd_strings,
        ),
        "prompt": st.one_of(odd_strings, st.lists(text, max_size=3), st.lists(st.integers(), max_size=3)),
        "messages": st.lists(
            st.one_of(
                st.fixed_dictionaries(
                    {
                        "role": st.one_of(st.sampled_from(ROLES), text, json_values),
                        "content": st.one_of(text, json_values),
                    }
                ),
                st.fixed_dictionaries(
                    {
                        "role": st.sampled_from(ROLES),
                        "content": st.lists(
                            st.one_of(
                                st.fixed_dictionaries({"type": st.just("text"), "text": text}),
                                st.fixed_dictionaries(
                                    {"type": st.sampled_from(["image_url", "text", ""]), "image_url": text}
                                ),
                                json_values,
                            ),
                            max_size=3,
                        ),
                    }
                ),
                st.dictionaries(st.sampled_from(["role", "content", "name", "tool_calls"]), json_values, max_size=3),
                json_values,
            ),
            max_size=3,
        ),
        "stop": st.one_of(
            odd_strings, st.lists(st.one_of(odd_strings, text), max_size=5), st.lists(json_values, max_size=3)
        ),
        "stream_options": st.one_of(
            st.fixed_dictionaries({"include_usage": json_values}), st.dictionaries(text, json_values, max_size=2)
        ),
        "logit_bias": st.dictionaries(st.integers().map(str), numbers, max_size=3),
        "max_tokens": odd_ints,
        "max_completion_tokens": odd_ints,
        "n": odd_ints,
        "seed": odd_ints,
        "temperature": odd_floats,
        "top_p": odd_floats,
    }.get(name, st.nothing())
    return st.one_of(near, near, near, numbers, text, json_values)  # near values three times as often


def sampling_fields() -> dict[str, st.SearchStrategy]:
    """The optional fields completions and chats share, each with valid values."""
    return {
        "temperature": st.one_of(st.none(), st.floats(0.0, 2.0)),
        "top_p": st.one_of(st.none(), st.floats(0.0, 1.0, exclude_min=True)),
        "seed": st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
        "stop": st.one_of(st.none(), st.text(max_size=5), st.lists(st.text(max_size=5), max_size=4)),
        "stream": st.booleans(),
        "stream_options": st.one_of(st.none(), st.fixed_dictionaries({}, optional={"include_usage": st.booleans()})),
        "n": st.just(1),
        "user": st.text(max_size=10),
    }


def valid_completion() -> st.SearchStrategy[dict[str, Any]]:
    # Small enough that prompt and output fit the tiny models' 256-token context whatever the
    # tokenizer does (it falls back to one token a byte at worst).
    return st.fixed_dictionaries(
        {
            "model": st.sampled_from(MODELS),
            "prompt": st.one_of(st.text(min_size=1, max_size=30), st.text(min_size=1, max_size=30).map(lambda s: [s])),
            "max_tokens": st.integers(1, 4),
        },
        optional={
            **sampling_fields(),
            "ignore_eos": st.booleans(),
            "logprobs": st.one_of(st.none(), st.integers(0, 5)),
        },
    )


@st.composite
def valid_chat(draw: st.DrawFn) -> dict[str, Any]:
    content = st.one_of(
        st.text(max_size=10),
        st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=5)}), min_size=1, max_size=2),
    )
    body = draw(
        st.fixed_dictionaries(
            {
                "model": st.sampled_from(MODELS),
                "messages": st.lists(
                    st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": content}), min_size=1, max_size=3
                ),
            },
            optional={**sampling_fields(), "logprobs": st.booleans()},
        )
    )
    # One or both (max_completion_tokens wins): without either, a chat runs to the end of the context.
    for name in draw(
        st.sampled_from([("max_tokens",), ("max_completion_tokens",), ("max_tokens", "max_completion_tokens")])
    ):
        body[name] = draw(st.integers(1, 4))
    return body


@st.composite
def near_valid(draw: st.DrawFn, chat: bool) -> dict[str, Any]:
    """A valid body with one to three fields set to something else (mostly), removed, or added."""
    body = draw(valid_chat() if chat else valid_completion())
    for _ in range(draw(st.integers(1, 3))):
        name = draw(
            st.one_of(st.sampled_from(READ_FIELDS), st.sampled_from(READ_FIELDS), st.sampled_from(IGNORED_FIELDS))
        )
        if name in body and draw(st.integers(0, 3)) == 0:
            del body[name]
        else:
            body[name] = draw(field_values(name))
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = draw(st.integers(1, 4))  # keeps an example that is still valid short
    return body


# ---- the properties ------------------------------------------------------------------------------


@settings(SETTINGS, max_examples=40)
@given(body=valid_completion())
def test_valid_completions_complete(http, body):
    assert_answer(post_json(http, "/v1/completions", body), valid=True)


@settings(SETTINGS, max_examples=40)
@given(body=valid_chat())
def test_valid_chat_completions_complete(http, body):
    assert_answer(post_json(http, "/v1/chat/completions", body), valid=True)


@settings(SETTINGS, max_examples=300)
@given(body=near_valid(chat=False))
def test_near_valid_completions(http, body):
    assert_answer(post_json(http, "/v1/completions", body))


@settings(SETTINGS, max_examples=300)
@given(body=near_valid(chat=True))
def test_near_valid_chat_completions(http, body):
    assert_answer(post_json(http, "/v1/chat/completions", body))


@settings(SETTINGS, max_examples=150)
@given(path=st.sampled_from(PATHS), body=json_values)
def test_arbitrary_json(http, path, body):
    assert_answer(post_json(http, path, body))


# Every odd value in every field the gateway reads, one at a time: a deterministic grid under the
# random search above, so no boundary is left to chance.
GRID_VALUES = [
    *ODD_INTS,
    *ODD_FLOATS,
    True,
    False,
    None,
    "",
    "\ud800",
    "x" * 5000,
    "💥",
    [],
    [""],
    ["\udfff"],
    ["a", 1],
    {},
    {"include_usage": True},
    {"a": 1},
    [[[]]],
]


@pytest.mark.parametrize("path", PATHS)
def test_every_odd_value_in_every_field(http, path):
    base = (
        {"model": MODELS[0], "prompt": "Hello", "max_tokens": 2}
        if path == "/v1/completions"
        else {"model": MODELS[1], "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}
    )
    for name in READ_FIELDS + ("logprobs",):
        for value in GRID_VALUES:
            response = post_json(http, path, {**base, name: value})
            try:
                assert_answer(response)
            except AssertionError as failure:
                raise AssertionError(f"{name}={value!r:.80}: {failure}") from None


CONTENT_TYPES = (
    None,
    "application/json",
    "application/json; charset=utf-16",
    "application/json; charset=latin-1",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz",
    "application/octet-stream",
    "application/vnd.api+json",
    "application/xml",
    "*/*",
    "json",
    "",
)


@st.composite
def raw_bodies(draw: st.DrawFn) -> bytes:
    """Bytes that are not JSON, JSON that is nearly so, JSON in other encodings, deep nesting."""
    valid = json.dumps({"model": MODELS[0], "prompt": "hi", "max_tokens": 1})
    depth = draw(st.sampled_from([10, 1000, 100_000]))
    cut = draw(st.integers(0, len(valid) - 1))
    return draw(
        st.one_of(
            st.binary(max_size=200),
            st.just(valid[:cut].encode()),  # cut short
            st.sampled_from(["utf-16", "utf-32", "utf-8-sig", "latin-1"]).map(lambda enc: valid.encode(enc)),
            st.just(('{"model": "tiny-llama", "prompt": ' + "[" * depth + "]" * depth + "}").encode()),
            st.just(("[" * depth).encode()),
            st.just(('{"a":' * depth + "1" + "}" * depth).encode()),
            st.sampled_from(
                [
                    b"\xff\xfe\xfd",
                    b'{"model": "tiny-llama", "prompt": "\xff"}',
                    b"null",
                    b"true",
                    b"1e999",
                    b'""',
                    b"[]",
                    b"{}",
                    b'{"model": NaN}',
                    b"{'model': 'x'}",
                    b'{"model": "a"} trailing',
                    b'{"model": "tiny-llama", "model": 5, "prompt": "dup"}',
                ]
            ),
        )
    )


@settings(SETTINGS, max_examples=150)
@given(path=st.sampled_from(PATHS), body=raw_bodies(), content_type=st.sampled_from(CONTENT_TYPES))
def test_raw_bytes_and_content_types(http, path, body, content_type):
    headers = {} if content_type is None else {"content-type": content_type}
    assert_answer(http.post(path, content=body, headers=headers))


# ---- regressions and limits ----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "path, fields, param",
    [
        ("/v1/completions", {"prompt": "\ud800"}, "prompt"),
        ("/v1/completions", {"prompt": ["a\udfffb"]}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "stop": "\udc80"}, "stop"),
        ("/v1/completions", {"prompt": "hi", "stop": ["ok", "\ud800"]}, "stop"),
        ("/v1/completions", {"model": "tiny\ud800", "prompt": "hi"}, "model"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\udfff"}]}, "messages[0].content"),
        (
            "/v1/chat/completions",
            {
                "messages": [
                    {"role": "user", "content": "ok"},
                    {"role": "user", "content": [{"type": "text", "text": "\ud800"}]},
                ]
            },
            "messages[1].content",
        ),
    ],
)
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


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("stream", [False, True])
def test_a_large_prompt_is_refused_whole(http, path, stream):
    """300k characters: over the context however they tokenize (400, not a hang or a 5xx)."""
    big = "hello " * 50_000
    body = {"model": MODELS[0], "max_tokens": 1, "stream": stream}
    body |= {"prompt": big} if path == "/v1/completions" else {"messages": [{"role": "user", "content": big}]}
    response = post_json(http, path, body)
    assert response.status_code == 400, response.text[:500]
    assert "context" in assert_error_body(response)["message"]


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/v1/completions"),
        ("PUT", "/v1/chat/completions"),
        ("DELETE", "/v1/models"),
        ("GET", "/v1/nothing"),
        ("POST", "/v1/models"),
        ("GET", "/v1/models/%ff%fe"),
        ("GET", "/v1/models/%00"),
        ("GET", "/v1/models/" + "x" * 5000),
        ("PATCH", "/health"),
    ],
)
def test_wrong_methods_and_paths(http, method, path):
    response = http.request(method, path)
    assert 400 <= response.status_code < 500, response.text[:500]
    assert_error_body(response)


def test_the_cluster_survived(cluster, http):
    """Runs last in this module: every process is alive, the gateway healthy and still serving."""
    dead = {name: p.returncode for name, p in cluster.processes.items() if p.poll() is not None}
    assert not dead, f"exited: {dead}"
    assert http.get("/health").status_code == 200
    for path, body in (
        ("/v1/completions", {"prompt": "Hello"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}]}),
    ):
        for model in MODELS:
            assert_answer(post_json(http, path, {"model": model, "max_tokens": 2, **body}), valid=True)
