"""ASGI middleware of the REST API's access control (services/gateway/access.py),
run inside the request-id middleware and before any route: it authenticates
the client, takes a request from its rate limit and reads the body up to
the client's size limit, answering 401, 429 or 413 itself, so a refused
request costs no parsing. The body is read here and handed on, which also
catches a chunked body that sends no Content-Length. The route finds the
client in `request.state.client`.

/health is always open; /metrics is open unless --metrics-auth (it is not
rate limited either way: scrapes are the operator's, not a client's)."""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.logs import request_id_var
from services.gateway.access import REST, AccessControl, Client
from services.gateway.errors import GatewayError, InvalidRequest, error_body

HEALTH_PATH = "/health"
METRICS_PATH = "/metrics"


class BodyTooLarge(Exception):
    pass


class ClientLeft(Exception):
    pass


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body; raises BodyTooLarge as soon as it passes
    `limit` bytes (nothing more is read) and ClientLeft on a disconnect."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientLeft()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge()
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the read body once, then what the client sends next (its disconnect)."""
    pending = True

    async def replay() -> Message:
        nonlocal pending
        if pending:
            pending = False
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class AccessMiddleware:
    def __init__(self, app: ASGIApp, access: AccessControl):
        self.app = app
        self.access = access

    def _is_open(self, path: str) -> bool:
        return path == HEALTH_PATH or (path == METRICS_PATH and not self.access.metrics_auth)

    async def _admit(self, scope: Scope, receive: Receive) -> tuple[Client, bytes]:
        headers = Headers(scope=scope)
        client = self.access.authenticate(headers.get("authorization"), REST)
        if scope["path"] != METRICS_PATH:
            self.access.admit(client, REST)
        declared = headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise InvalidRequest(f"Content-Length must be a number, got {declared!r}") from None
            self.access.check_size(client, size, REST)  # before reading a byte of it
        try:
            body = await read_body(receive, client.limits.max_request_bytes)
        except BodyTooLarge:
            raise self.access.too_large(client, REST) from None
        return client, body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        try:
            client, body = await self._admit(scope, receive)
        except ClientLeft:
            return  # nobody to answer
        except GatewayError as error:
            request_id = scope.get("state", {}).get("request_id") or request_id_var.get()
            response = JSONResponse(
                error_body(error, request_id), status_code=error.http_status, headers=error.http_headers()
            )
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})["client"] = client
        await self.app(scope, _replaying(body, receive), send)
