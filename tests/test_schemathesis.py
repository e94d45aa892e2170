"""schemathesis over the gateway's own OpenAPI spec (/openapi.json), every
operation sent to the live gateway of the session's real local cluster
(conftest's `cluster`), in schemathesis' positive (valid per the spec) and
negative (invalid) modes.

Checks: no 5xx (not_a_server_error), and the spec is truthful: each answer's
status, content type and body are among those the operation declares (a 4xx
is an OpenAI error object, a 200 a completion, a stream server-sent events).
The spec's `model` is narrowed to the served models, so that valid requests
reach the engines instead of all ending in 404.

Derandomized and bounded (max_examples per operation and mode) to stay a few
seconds on a small machine."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

MODELS = ["tiny-llama", "tiny-qwen2"]
TIMEOUT_S = 60.0  # per request: far beyond any answer here, so reaching it is a hang
CHECKS = [
    schemathesis.checks.not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def gateway_schema(cluster):
    raw = httpx.get(cluster.http_url + "/openapi.json", timeout=10).json()
    for body in ("CompletionRequest", "ChatCompletionRequest"):
        raw["components"]["schemas"][body]["properties"]["model"]["enum"] = MODELS
    schema = schemathesis.openapi.from_dict(raw)
    schema.config.update(base_url=cluster.http_url, request_timeout=TIMEOUT_S)
    return schema


OPERATIONS = [
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
]


def test_every_operation_is_covered(gateway_schema):
    declared = {(op.ok().method.upper(), op.ok().path) for op in gateway_schema.get_all_operations()}
    assert declared == set(OPERATIONS)


# Every operation with valid input; those with a body also with invalid bodies (the others' only
# parameter, a path segment, has no invalid value).
CASES = [(method, path, GenerationMode.POSITIVE) for method, path in OPERATIONS] + [
    (method, path, GenerationMode.NEGATIVE) for method, path in OPERATIONS if method == "POST"
]


@pytest.mark.parametrize("method, path, mode", CASES, ids=lambda v: str(v))
def test_the_gateway_keeps_to_its_spec(gateway_schema, method, path, mode):
    # schemathesis.pytest.from_fixture would parametrize this itself, but it reads a node attribute
    # (`_nodeid`) that pytest 9 no longer has; the operation's hypothesis strategy does the same.
    operation = gateway_schema[path][method]

    @settings(
        max_examples=50,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def keeps_to_the_spec(case):
        case.call_and_validate(checks=CHECKS)

    keeps_to_the_spec()


def test_the_cluster_survived(cluster):
    """Runs last in this module: every process alive, the gateway healthy."""
    dead = {name: p.returncode for name, p in cluster.processes.items() if p.poll() is not None}
    assert not dead, f"exited: {dead}"
    assert httpx.get(cluster.http_url + "/health", timeout=10).status_code == 200
