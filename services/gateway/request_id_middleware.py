"""ASGI middleware giving every HTTP request its id before anything else
runs (validation errors included): it lands in `request.state.request_id`
and in `request_id_var` for log lines, and goes back in the X-Request-Id
response header. It also logs one line per request."""

from __future__ import annotations

import logging
import time

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.logs import request_id_var
from services.gateway.request_ids import CHAT_PREFIX, COMPLETION_PREFIX, HEADER, OTHER_PREFIX, choose_request_id

log = logging.getLogger(__name__)


def _prefix(path: str) -> str:
    if path.endswith("/chat/completions"):
        return CHAT_PREFIX
    if path.endswith("/completions"):
        return COMPLETION_PREFIX
    return OTHER_PREFIX


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = choose_request_id(Headers(scope=scope).get(HEADER), _prefix(scope["path"]))
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        start = time.monotonic()
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            # Polls (health, metrics, model lists) would drown the requests that matter.
            level = logging.INFO if scope["method"] == "POST" else logging.DEBUG
            log.log(
                level,
                "%s %s -> %s in %.3fs",
                scope["method"],
                scope["path"],
                status or "no response",
                time.monotonic() - start,
            )
            request_id_var.reset(token)
