"""The OpenAI-compatible REST API (FastAPI): /v1/models, /v1/completions,
/v1/chat/completions, plus /health and /metrics.

Generation awaits the agent's first response before answering, so errors
that happen before any output get real HTTP statuses even when streaming;
an error after the stream began is sent as an SSE error event followed by
[DONE]. A client that disconnects gets its agent call cancelled.

API keys and limits (services/gateway/access.py): the access middleware
authenticates and size-checks every request but /health (and /metrics unless
--metrics-auth); the routes check the model and the request's limits and
hold a stream slot for each generation until it ends, however it ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from prism_client.v1 import generate_pb2
from services.common.logs import request_id_var
from services.gateway.access import REST, AccessControl, Client
from services.gateway.access_middleware import AccessMiddleware
from services.gateway.errors import (
    ClientGone,
    GatewayError,
    InternalError,
    InvalidRequest,
    MissingParameter,
    ModelNotFound,
    error_body,
)
from services.gateway.limits import StreamSlot
from services.gateway.metrics import UNKNOWN_MODEL, GatewayMetrics, RequestTracker
from services.gateway.openai_format import SSE_DONE, OpenAIFormat, finish_reason, sse_event
from services.gateway.openai_schema import (
    SSE_EVENTS,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    Health,
    ModelList,
    ModelObject,
)
from services.gateway.relay import AgentStream, Relay
from services.gateway.request_id_middleware import RequestIdMiddleware
from services.gateway.request_ids import HEADER
from services.gateway.router import Router
from services.gateway.validation import validate_generate_request

log = logging.getLogger(__name__)

T = TypeVar("T")


# ---- errors ---------------------------------------------------------------


def _request_id(request: Request) -> str:
    return getattr(request.state, "request_id", None) or request_id_var.get()


def _error_response(request: Request, error: GatewayError) -> JSONResponse:
    return JSONResponse(
        error_body(error, _request_id(request)), status_code=error.http_status, headers=error.http_headers()
    )


def _client(request: Request) -> Client:
    """Who sent the request, as the access middleware found it."""
    return request.state.client


def _param_path(loc: list[Any]) -> str:
    """("messages", 0, "role") -> "messages[0].role"."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def invalid_request_from(exc: RequestValidationError) -> InvalidRequest:
    """The first validation error, worded for a person and naming its field."""
    error = exc.errors()[0]
    loc = list(error.get("loc", ()))
    if loc and loc[0] == "body":
        loc = loc[1:]
    kind = error.get("type", "")
    ctx = error.get("ctx") or {}
    if kind == "json_invalid":
        return InvalidRequest(f"the request body is not valid JSON: {ctx.get('error', error.get('msg'))}")
    param = _param_path(loc)
    if not param:
        return InvalidRequest("the request body must be a JSON object")
    if kind == "missing":
        return MissingParameter(f"{param} is required", param=param)
    message = str(ctx["error"]) if kind == "value_error" and "error" in ctx else error.get("msg", "is invalid")
    return InvalidRequest(f"{param}: {message}", param=param)


# ---- streaming ------------------------------------------------------------


async def _until_disconnected(receive: Receive) -> None:
    # The body has been read, so the next message is the client leaving.
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`, cancelling it and raising ClientGone if the client disconnects first."""
    work_task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_until_disconnected(request.receive))
    try:
        await asyncio.wait({work_task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work_task.done():
            work_task.cancel()
            await asyncio.wait({work_task})  # let it unwind (its agent call is cancelled on the way)
    if work_task.cancelled():
        raise ClientGone()
    return work_task.result()


class RelayedStreamResponse(StreamingResponse):
    """A streaming response that runs `on_close` however it ends, including
    when Starlette cancels it because the client disconnected."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]):
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _sse_events(
    stream: AgentStream, fmt: OpenAIFormat, tracker: RequestTracker, include_usage: bool, slot: StreamSlot
) -> AsyncIterator[bytes]:
    try:
        for chunk in fmt.opening_chunks():
            yield sse_event(chunk)
        usage = None
        async for piece in stream:
            tracker.tokens(len(piece.token_ids))
            for chunk in fmt.piece_chunks(piece):
                yield sse_event(chunk)
            if finish_reason(piece) is not None:
                usage = piece.usage
        if include_usage and usage is not None:
            yield sse_event(fmt.usage_chunk(usage))
        tracker.finish(200)
    except GatewayError as error:
        log.warning("stream failed after it began: %s", error.message)
        tracker.finish(error.http_status)
        yield sse_event(error_body(error, fmt.request_id))
    except Exception as exc:
        log.exception("stream failed after it began")
        internal = InternalError(f"request {fmt.request_id} failed in the gateway: {exc}")
        tracker.finish(internal.http_status)
        yield sse_event(error_body(internal, fmt.request_id))
    # Free before [DONE] goes out, so a client that opens its next stream on [DONE] finds the slot.
    slot.release()
    yield SSE_DONE


async def _collect(stream: AgentStream, fmt: OpenAIFormat, tracker: RequestTracker) -> dict[str, Any]:
    texts: list[str] = []
    last = stream.first
    async for piece in stream:
        tracker.tokens(len(piece.token_ids))
        texts.append(piece.text)
        last = piece
    return fmt.response("".join(texts), finish_reason(last), last.usage)


# ---- the app ---------------------------------------------------------------

# What each operation answers, for the OpenAPI spec: every 4xx and 5xx is an ErrorResponse.
ERRORS: dict[int | str, dict[str, Any]] = {"4XX": {"model": ErrorResponse}, "5XX": {"model": ErrorResponse}}


def _generation_responses(body: type) -> dict[int | str, dict[str, Any]]:
    return {
        200: {
            "model": body,
            "description": "The answer, or with `stream` its chunks as server-sent events",
            "content": {"text/event-stream": SSE_EVENTS},
        },
        **ERRORS,
    }


def create_app(router: Router, relay: Relay, metrics: GatewayMetrics, access: AccessControl) -> FastAPI:
    app = FastAPI(title="Prism gateway", summary="OpenAI-compatible API of a Prism cluster")
    app.add_middleware(AccessMiddleware, access=access)
    app.add_middleware(RequestIdMiddleware)  # added last, so it runs first: access refusals carry the id
    started = int(time.time())

    @app.exception_handler(GatewayError)
    async def on_gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return _error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(request, invalid_request_from(exc))

    @app.exception_handler(ClientGone)
    async def on_client_gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=ClientGone.http_status)  # nobody reads it

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = {
            "error": {
                "message": f"{exc.detail} ({request.method} {request.url.path})",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
                "request_id": _request_id(request),
            }
        }
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Runs outside the request-id middleware, so the header is added here.
        request_id = _request_id(request)
        log.error("request %s failed in the gateway: %r", request_id, exc)
        error = InternalError(f"request {request_id} failed in the gateway: {exc}")
        return JSONResponse(error_body(error, request_id), status_code=500, headers={HEADER: request_id})

    @app.get(
        "/health",
        response_model=None,
        responses={
            200: {"model": Health},
            503: {"model": Health, "description": "The cluster state is not loaded yet"},
        },
    )
    async def health() -> JSONResponse:
        if router.ready:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "loading cluster state from etcd"}, status_code=503)

    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={
            200: {"description": "Prometheus text format"},
            "4XX": {
                "description": "With --metrics-auth, a missing or unknown API key (401)",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
            },
        },
    )
    async def prometheus_metrics() -> Response:
        return Response(await metrics.render_cluster(router), media_type=metrics.content_type)

    def model_object(name: str, available: bool, max_context: int) -> dict[str, Any]:
        # `available` and `max_context` are ours; OpenAI clients ignore them.
        return {
            "id": name,
            "object": "model",
            "created": started,
            "owned_by": "prism",
            "available": available,
            "max_context": max_context,
        }

    @app.get("/v1/models", response_model=None, responses={200: {"model": ModelList}, **ERRORS})
    async def list_models(request: Request) -> dict[str, Any]:
        client = _client(request)
        models = [m for m in router.list_models() if client.may_use(m.name)]
        return {"object": "list", "data": [model_object(m.name, m.available, m.max_context) for m in models]}

    @app.get("/v1/models/{model:path}", response_model=None, responses={200: {"model": ModelObject}, **ERRORS})
    async def retrieve_model(model: str, request: Request) -> dict[str, Any]:
        access.check_model(_client(request), model, REST)
        for m in router.list_models():
            if m.name == model:
                return model_object(m.name, m.available, m.max_context)
        raise ModelNotFound(f"The model {model!r} does not exist", param="model")

    async def generate(
        request: Request,
        grpc_request: generate_pb2.GenerateRequest,
        api: str,
        *,
        chat: bool,
        stream: bool,
        include_usage: bool,
    ) -> Response:
        model = grpc_request.model
        tracker = metrics.track(api, model if router.has_model(model) else UNKNOWN_MODEL)
        agent_stream: AgentStream | None = None
        slot: StreamSlot | None = None
        try:
            validate_generate_request(grpc_request)
            client = _client(request)
            access.check_generate(client, grpc_request, REST)
            slot = access.open_stream(client, REST)
            agent_stream = await _unless_client_leaves(request, relay.open(grpc_request))
            fmt = OpenAIFormat(grpc_request.request_id, model, chat)
            if stream:
                opened, held = agent_stream, slot

                def on_close() -> None:
                    opened.cancel()
                    held.release()  # a no-op unless the stream ended early (client gone)
                    tracker.finish(ClientGone.http_status)  # a no-op unless the client left mid-stream

                events = _sse_events(agent_stream, fmt, tracker, include_usage, slot)
                agent_stream = slot = None  # the response owns them now
                return RelayedStreamResponse(events, on_close)
            body = await _unless_client_leaves(request, _collect(agent_stream, fmt, tracker))
            tracker.finish(200)
            return JSONResponse(body)
        except (GatewayError, ClientGone) as exc:
            tracker.finish(exc.http_status)
            raise
        except asyncio.CancelledError:
            tracker.finish(ClientGone.http_status)
            raise
        except Exception:
            tracker.finish(500)
            raise
        finally:
            if agent_stream is not None:
                agent_stream.cancel()
            if slot is not None:
                slot.release()

    @app.post("/v1/completions", response_model=None, responses=_generation_responses(Completion))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        grpc_request = body.to_grpc(_request_id(request))
        if body.max_tokens is None:  # OpenAI's default, which the client did not ask for: kept within its cap
            cap = _client(request).limits.max_tokens_cap
            grpc_request.sampling.max_tokens = min(grpc_request.sampling.max_tokens, cap)
        return await generate(
            request, grpc_request, "completions", chat=False, stream=body.stream, include_usage=body.include_usage_chunk
        )

    @app.post("/v1/chat/completions", response_model=None, responses=_generation_responses(ChatCompletion))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await generate(
            request,
            body.to_grpc(_request_id(request)),
            "chat",
            chat=True,
            stream=body.stream,
            include_usage=body.include_usage_chunk,
        )

    return app
