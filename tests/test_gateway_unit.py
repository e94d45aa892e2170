"""Pure parts of the gateway: request translation, validation, response
shapes, error mapping and request ids. No servers."""

from __future__ import annotations

import grpc
import pytest
from pydantic import ValidationError

from prism_client.v1 import generate_pb2
from services.gateway.errors import (
    GatewayTimeout,
    InternalError,
    InvalidRequest,
    ModelNotFound,
    ModelUnavailable,
    RateLimited,
    error_body,
    from_agent_error,
)
from services.gateway.openai_format import SSE_DONE, OpenAIFormat, sse_event
from services.gateway.openai_schema import ChatCompletionRequest, CompletionRequest
from services.gateway.request_ids import choose_request_id, prefix_for
from services.gateway.validation import validate_generate_request


def test_completion_request_translation():
    body = CompletionRequest.model_validate(
        {"model": "m", "prompt": ["hi"], "temperature": 0, "stop": "x", "seed": 3, "frobnicate": True}
    )
    request = body.to_grpc("cmpl-1")
    assert (request.request_id, request.model, request.prompt) == ("cmpl-1", "m", "hi")
    assert request.sampling.max_tokens == 16
    assert request.sampling.HasField("temperature") and request.sampling.temperature == 0
    assert not request.sampling.HasField("top_p")
    assert list(request.sampling.stop) == ["x"] and request.sampling.seed == 3


def test_null_max_tokens_means_the_default():
    request = CompletionRequest.model_validate({"model": "m", "prompt": "hi", "max_tokens": None}).to_grpc("r")
    assert request.sampling.max_tokens == 16


def test_chat_request_translation():
    body = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "max_tokens": 7,
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hi", "name": "ann"}],
        }
    )
    request = body.to_grpc("chatcmpl-1")
    assert request.WhichOneof("input") == "chat"
    assert [(m.role, m.content) for m in request.chat.messages] == [("user", "hi")]
    assert request.sampling.max_tokens == 7 and body.include_usage_chunk


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "prompt": "hi", "temperature": True},
        {"model": "m", "prompt": "hi", "max_tokens": 2**31},
        {"model": "m", "prompt": "hi", "seed": 2**63},
        {"model": "m", "prompt": "hi", "stop": ["a", 1]},
        {"model": "", "prompt": "hi"},
    ],
)
def test_schema_rejects(body):
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate(body)


def _request(**sampling) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(model="m", prompt="hi", sampling=generate_pb2.SamplingParams(**sampling))


@pytest.mark.parametrize(
    "sampling, param",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": 2.01}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
    ],
)
def test_validation_names_the_field(sampling, param):
    with pytest.raises(InvalidRequest) as caught:
        validate_generate_request(_request(**sampling))
    assert caught.value.param == param and param in caught.value.message


def test_validation_accepts_the_edges():
    validate_generate_request(_request(max_tokens=1, temperature=0.0, top_p=1.0))
    validate_generate_request(_request(temperature=2.0, top_p=1e-6))


@pytest.mark.parametrize(
    "code, error_class, status",
    [
        (grpc.StatusCode.INVALID_ARGUMENT, InvalidRequest, 400),
        (grpc.StatusCode.NOT_FOUND, ModelNotFound, 404),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, RateLimited, 429),
        (grpc.StatusCode.UNAVAILABLE, ModelUnavailable, 503),
        (grpc.StatusCode.DEADLINE_EXCEEDED, GatewayTimeout, 504),
        (grpc.StatusCode.INTERNAL, InternalError, 500),
        (grpc.StatusCode.CANCELLED, InternalError, 500),
    ],
)
def test_agent_codes_map_to_errors(code, error_class, status):
    error = from_agent_error(code, "why", model="m", request_id="cmpl-9", timeout_s=5)
    assert type(error) is error_class and error.http_status == status
    if status == 500:  # anything unexpected is INTERNAL, with the id to find the agent's log lines
        assert error.grpc_code == grpc.StatusCode.INTERNAL and "cmpl-9" in error.message
    else:
        assert error.grpc_code == code


def test_error_body_is_openai_shaped():
    body = error_body(ModelNotFound("The model 'x' does not exist", param="model"), "cmpl-2")
    assert body == {
        "error": {
            "message": "The model 'x' does not exist",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
            "request_id": "cmpl-2",
        }
    }


def test_stream_chunks():
    chat = OpenAIFormat("chatcmpl-1", "m", chat=True)
    assert chat.opening_chunks()[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    last = generate_pb2.GenerateResponse(text="end", finish_reason=generate_pb2.FINISH_REASON_LENGTH)
    content, finish = chat.piece_chunks(last)
    assert content["choices"][0]["delta"] == {"content": "end"} and content["choices"][0]["finish_reason"] is None
    assert finish["choices"][0] | {"index": 0} == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert chat.piece_chunks(generate_pb2.GenerateResponse(text="")) == []  # nothing decoded yet: nothing sent
    usage = chat.usage_chunk(generate_pb2.Usage(prompt_tokens=2, completion_tokens=3))
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 5
    completion = OpenAIFormat("cmpl-1", "m", chat=False)
    assert completion.opening_chunks() == []
    assert completion.piece_chunks(generate_pb2.GenerateResponse(text="x"))[0]["choices"][0]["text"] == "x"


def test_sse_framing():
    assert sse_event({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()
    assert SSE_DONE == b"data: [DONE]\n\n"


@pytest.mark.parametrize(
    "client_id, kept",
    [
        ("abc-123", True),
        ("x" * 128, True),
        ("", False),
        (None, False),
        ("has space", False),
        ("line\nbreak", False),
        ("x" * 129, False),
    ],
)
def test_request_ids(client_id, kept):
    chosen = choose_request_id(client_id, "cmpl")
    assert (chosen == client_id) == kept
    if not kept:
        assert chosen.startswith("cmpl-") and len(chosen) == len("cmpl-") + 32


def test_request_id_prefixes():
    assert prefix_for(generate_pb2.GenerateRequest(prompt="x")) == "cmpl"
    assert prefix_for(generate_pb2.GenerateRequest(chat=generate_pb2.ChatInput())) == "chatcmpl"


def test_every_429_from_an_agent_says_when_to_retry():
    """The agent's shedder sends its own Retry-After; a refusal without one (no room to switch the model
    on now) still gets one, so a client's backoff never has to guess (a 429 without it was seen in CI)."""
    from services.gateway.errors import AGENT_REFUSAL_RETRY_AFTER_S, from_agent_error

    hinted = from_agent_error(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "shed", model="m", request_id="r", timeout_s=1, retry_after_s=3
    )
    assert hinted.http_status == 429 and hinted.http_headers() == {"Retry-After": "3"}
    unhinted = from_agent_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "no room", model="m", request_id="r", timeout_s=1)
    assert unhinted.http_headers() == {"Retry-After": str(AGENT_REFUSAL_RETRY_AFTER_S)}
