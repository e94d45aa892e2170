"""Request ids: the client's own when it sent a usable one, else a fresh
`<prefix>-<uuid hex>` in OpenAI's style (cmpl-, chatcmpl-)."""

from __future__ import annotations

import logging
import re
import uuid

from prism_client.v1 import generate_pb2

log = logging.getLogger(__name__)

COMPLETION_PREFIX = "cmpl"
CHAT_PREFIX = "chatcmpl"
OTHER_PREFIX = "req"
HEADER = "x-request-id"  # also the gRPC metadata key

# A client-chosen id ends up in every log line of its request: it must be one
# visible-ASCII token of modest length, so it cannot forge or split lines.
_USABLE = re.compile(r"[\x21-\x7e]{1,128}")


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def choose_request_id(client_id: str | None, prefix: str) -> str:
    if client_id and _USABLE.fullmatch(client_id):
        return client_id
    if client_id:
        log.warning("ignoring unusable client request id %r", client_id[:200])
    return new_request_id(prefix)


def prefix_for(request: generate_pb2.GenerateRequest) -> str:
    return CHAT_PREFIX if request.WhichOneof("input") == "chat" else COMPLETION_PREFIX
