"""The checks every GenerateRequest passes at the gateway, whichever API it
came in by, so a bad request fails fast with INVALID_ARGUMENT / HTTP 400
instead of occupying an agent. The engine checks again (it alone knows the
model's context length)."""

from __future__ import annotations

from prism_client.v1 import generate_pb2
from services.gateway.errors import InvalidRequest

CHAT_ROLES = ("system", "user", "assistant")
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
INT32_MAX = 2**31 - 1  # max_tokens travels as a protobuf int32
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def validate_generate_request(request: generate_pb2.GenerateRequest) -> None:
    """Raises InvalidRequest naming the first bad field."""
    if not request.model:
        raise InvalidRequest("model is required", param="model")
    which = request.WhichOneof("input")
    if which is None:
        raise InvalidRequest("give a prompt or chat messages", param="prompt")
    if which == "prompt" and not request.prompt:
        raise InvalidRequest("prompt must not be empty", param="prompt")
    if which == "chat":
        if not request.chat.messages:
            raise InvalidRequest("messages must not be empty", param="messages")
        for i, message in enumerate(request.chat.messages):
            if message.role not in CHAT_ROLES:
                raise InvalidRequest(
                    f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}; got {message.role!r}",
                    param=f"messages[{i}].role",
                )
    sampling = request.sampling
    if sampling.HasField("max_tokens") and sampling.max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be at least 1, got {sampling.max_tokens}", param="max_tokens")
    # Written as `not (in range)` so NaN fails too.
    if sampling.HasField("temperature") and not 0.0 <= sampling.temperature <= MAX_TEMPERATURE:
        raise InvalidRequest(
            f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {sampling.temperature:g}", param="temperature"
        )
    if sampling.HasField("top_p") and not 0.0 < sampling.top_p <= 1.0:
        raise InvalidRequest(f"top_p must be in (0, 1], got {sampling.top_p:g}", param="top_p")
