"""Sends a GenerateRequest to an agent and relays its stream.

open() returns only once the agent's first response has arrived, so every
failure before generation starts (unknown model, prompt over the context,
no live replica) surfaces as an exception the caller can still turn into a
real HTTP status or gRPC code. An agent that is unreachable (UNAVAILABLE
before any output) is skipped for the model's next live replica. A request
an agent sends back unstarted because its engine began draining (UNAVAILABLE
with the draining marker) goes to the model's replicas as the router sees
them now. A model with no live replica at all is first waited for
(services/gateway/cold_start.py).

The relay knows every generation it has in flight (opening or streaming),
for the gateway's drain on SIGTERM: end_all() ends those still going at the
end of the grace with GatewayShuttingDown (503 / UNAVAILABLE), which the
APIs send as they send any error (an SSE error event then [DONE], a JSON
error, a gRPC status with the gateway's trailers), rather than letting the
servers cut them; a request that comes to open() after it fails so at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

import grpc

from prism_client.v1 import generate_pb2
from services.common.grpc_util import DRAINING_KEY
from services.gateway.errors import GatewayError, InternalError, ModelUnavailable, from_agent_error, retry_after_of
from services.gateway.request_ids import HEADER
from services.gateway.router import Router

if TYPE_CHECKING:
    from services.gateway.cold_start import ColdStart

log = logging.getLogger(__name__)

# How often one request may be sent back by draining engines before the relay stops re-routing it (a
# request that arrives while an engine drains is served there, so one bounce is the most expected).
MAX_DRAIN_BOUNCES = 3


# Requests whose first this many characters agree are sent to the same replica while its load allows
# (services/common/routing.py): about the first 30 of an engine's 16-token prefix-cache blocks.
PREFIX_KEY_CHARS = 512


def prefix_key(request: generate_pb2.GenerateRequest) -> str | None:
    """What requests that could share cached KV have in common, for the router: the beginning of the
    prompt; for a chat, its messages up to the first user message (the system prompt and the
    conversation's opening), which every later turn of the conversation repeats. None for an empty one."""
    if request.HasField("chat"):
        opening = []
        for m in request.chat.messages:
            opening.append(f"{m.role}\0{m.content}\0")
            if m.role == "user":
                break
        text = "".join(opening)
    else:
        text = request.prompt
    return text[:PREFIX_KEY_CHARS] or None


def _sent_back_draining(exc: grpc.aio.AioRpcError) -> bool:
    return any(key == DRAINING_KEY for key, _ in exc.trailing_metadata() or ())


class GatewayShuttingDown(GatewayError):
    """The gateway stops (SIGTERM) and its grace ended before this request did; another gateway can take
    it at once."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    error_type = "service_unavailable_error"
    error_code = "gateway_shutting_down"


def shutting_down(request_id: str) -> GatewayShuttingDown:
    return GatewayShuttingDown(
        f"request {request_id} was ended unfinished: the gateway is shutting down and its "
        "grace has passed; send it again",
        retry_after_s=1,
    )


def _cancelling() -> bool:
    """Whether the running task is being cancelled."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class AgentStream:
    """An agent's Generate call whose first response has arrived. Iterate it
    for every response (the first included); failures raise GatewayError.
    cancel() ends the call, freeing the engine's slot; it is safe to call at
    any time, also after the stream finished. end(error) ends it so that its
    reader gets `error`."""

    def __init__(
        self,
        call: grpc.aio.UnaryStreamCall,
        first: generate_pb2.GenerateResponse,
        request: generate_pb2.GenerateRequest,
        address: str,
        timeout_s: float,
        on_done: Callable[[AgentStream], None] | None = None,
    ):
        self._call = call
        self.first = first
        self._request = request
        self.address = address
        self._timeout_s = timeout_s
        self._on_done = on_done  # told once, when the stream is cancelled or has ended
        self._ended_with: GatewayError | None = None

    def cancel(self) -> None:
        self._call.cancel()
        if self._on_done is not None:
            on_done, self._on_done = self._on_done, None
            on_done(self)

    def end(self, error: GatewayError) -> None:
        """Ends the call; the reader's next read raises `error` (unless the last response is already here)."""
        self._ended_with = error
        self._call.cancel()

    def _error(self, exc: grpc.aio.AioRpcError) -> GatewayError:
        return from_agent_error(
            exc.code(),
            exc.details(),
            model=self._request.model,
            request_id=self._request.request_id,
            timeout_s=self._timeout_s,
            retry_after_s=retry_after_of(exc.trailing_metadata()),
        )

    async def __aiter__(self) -> AsyncIterator[generate_pb2.GenerateResponse]:
        response = self.first
        try:
            while True:
                yield response
                if response.finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED:
                    return  # the contract's last response; the agent ends the call itself
                try:
                    response = await self._call.read()
                except grpc.aio.AioRpcError as exc:
                    if self._ended_with is not None:
                        raise self._ended_with from None
                    raise self._error(exc) from None
                except asyncio.CancelledError:
                    # grpc.aio raises CancelledError from a call cancelled here: from end(), that is the
                    # error to report, unless our own task is being cancelled too (the client left).
                    task = asyncio.current_task()
                    if self._ended_with is not None and (task is None or not task.cancelling()):
                        raise self._ended_with from None
                    raise
                if response is grpc.aio.EOF:
                    raise InternalError(
                        f"request {self._request.request_id}: the agent at {self.address} "
                        "ended the stream without a finish reason"
                    )
        finally:
            self.cancel()  # a no-op when the call is complete


class Relay:
    def __init__(self, router: Router, timeout_s: float, cold_start: ColdStart | None = None):
        self.router = router
        self.timeout_s = timeout_s
        self.cold_start = cold_start  # None: a model without a live replica fails at once
        self._streams: set[AgentStream] = set()  # streaming: open() returned them, not yet done
        self._opening = 0  # in open(): routing, waiting for a model, or for the first response
        self._ending: asyncio.Event | None = None  # set by end_all(); made in the serving loop

    @property
    def in_flight(self) -> int:
        """Generations opening or streaming."""
        return self._opening + len(self._streams)

    @property
    def ending(self) -> bool:
        return self._ending is not None and self._ending.is_set()

    def end_all(self) -> int:
        """Ends every generation in flight with GatewayShuttingDown, and every later open() at once
        (the gateway's grace is over); returns how many were in flight."""
        if self._ending is None:
            self._ending = asyncio.Event()
        self._ending.set()  # the ones opening raise it themselves
        left = self.in_flight
        for stream in list(self._streams):
            stream.end(shutting_down(stream._request.request_id))
        return left

    def _stream_done(self, stream: AgentStream) -> None:
        self._streams.discard(stream)
        self.router.ended(stream._request.model, stream.address)

    async def open(self, request: generate_pb2.GenerateRequest) -> AgentStream:
        """Raises GatewayError (ModelNotFound, ModelUnavailable, InvalidRequest, ...;
        GatewayShuttingDown once end_all() was called). A model without a
        live replica is waited for first (cold start)."""
        if self._ending is None:
            self._ending = asyncio.Event()
        if self._ending.is_set():
            raise shutting_down(request.request_id)
        self._opening += 1
        opening = asyncio.ensure_future(self._open(request))
        ending = asyncio.ensure_future(self._ending.wait())
        try:
            await asyncio.wait({opening, ending}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when our caller is cancelled (its client left): the open goes with it
            self._opening -= 1
            ending.cancel()
            if not opening.done():
                opening.cancel()
                await asyncio.wait({opening})  # let it unwind (its agent call is cancelled on the way)
            elif _cancelling() and not opening.cancelled() and opening.exception() is None:
                opening.result().cancel()  # opened just as our caller left: nobody will read it
        if opening.cancelled():
            raise shutting_down(request.request_id)
        stream = opening.result()  # or its GatewayError
        self._streams.add(stream)
        if self._ending.is_set():  # opened as the grace ended
            stream.end(shutting_down(request.request_id))
        return stream

    async def _open(self, request: generate_pb2.GenerateRequest) -> AgentStream:
        candidates = await self._candidates(request)
        deadline = time.monotonic() + self.timeout_s
        unreachable: list[str] = []
        bounces = 0
        while candidates:
            address = candidates.pop(0)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # In flight from here until the stream ends (_stream_done) or this attempt fails: the router
            # sends the next requests to the replicas with the fewest.
            self.router.began(request.model, address)
            handed_over = False
            try:
                call = self.router.stub(address).Generate(
                    request, timeout=remaining, metadata=((HEADER, request.request_id),)
                )
                try:
                    first = await call.read()
                except grpc.aio.AioRpcError as exc:
                    draining = exc.code() == grpc.StatusCode.UNAVAILABLE and _sent_back_draining(exc)
                    # The agent has no engine of the model: unloaded (shed, moved) after the routing this
                    # gateway holds last saw it. The model exists; this replica is gone: route again.
                    gone = exc.code() == grpc.StatusCode.NOT_FOUND
                    if gone:
                        log.info(
                            "request %s: the agent at %s no longer serves %s (%s); routing it again",
                            request.request_id,
                            address,
                            request.model,
                            exc.details(),
                        )
                        unreachable.append(f"agent at {address}: {exc.details()}")
                    if (draining or gone) and bounces < MAX_DRAIN_BOUNCES:
                        bounces += 1
                        if draining:
                            log.info(
                                "request %s sent back by the draining engine of %s at %s; routing it again",
                                request.request_id,
                                request.model,
                                address,
                            )
                        candidates = [c for c in await self._candidates(request) if not (gone and c == address)]
                        continue
                    if gone:
                        continue
                    if exc.code() == grpc.StatusCode.UNAVAILABLE:
                        log.warning("agent at %s unavailable for %s: %s", address, request.model, exc.details())
                        unreachable.append(f"agent at {address}: {exc.details()}")
                        continue
                    raise from_agent_error(
                        exc.code(),
                        exc.details(),
                        model=request.model,
                        request_id=request.request_id,
                        timeout_s=self.timeout_s,
                        retry_after_s=retry_after_of(exc.trailing_metadata()),
                    ) from None
                except BaseException:  # our caller was cancelled (its client left): end the call too
                    call.cancel()
                    raise
                if first is grpc.aio.EOF:
                    raise InternalError(
                        f"request {request.request_id}: the agent at {address} ended the stream without any response"
                    )
                stream = AgentStream(call, first, request, address, self.timeout_s, on_done=self._stream_done)
                handed_over = True
                return stream
            finally:
                if not handed_over:
                    self.router.ended(request.model, address)
        if not unreachable:
            raise from_agent_error(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                None,
                model=request.model,
                request_id=request.request_id,
                timeout_s=self.timeout_s,
            )
        raise ModelUnavailable(f"model {request.model!r} has no live replica ({'; '.join(unreachable)})")

    async def _candidates(self, request: generate_pb2.GenerateRequest) -> list[str]:
        key = prefix_key(request)
        if self.cold_start is not None:
            return await self.cold_start.candidates(request.model, key)
        return self.router.candidates(request.model, key)
