"""Sends a GenerateRequest to an agent and relays its stream.

open() returns only once the agent's first response has arrived, so every
failure before generation starts (unknown model, prompt over the context,
no live replica) surfaces as an exception the caller can still turn into a
real HTTP status or gRPC code. An agent that is unreachable (UNAVAILABLE
before any output) is skipped for the model's next live replica. A model
with no live replica at all is first waited for (services/gateway/cold_start.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from prism.v1 import generate_pb2
from services.gateway.errors import GatewayError, InternalError, ModelUnavailable, from_agent_error, retry_after_of
from services.gateway.request_ids import HEADER
from services.gateway.router import Router

if TYPE_CHECKING:
    from services.gateway.cold_start import ColdStart

log = logging.getLogger(__name__)


class AgentStream:
    """An agent's Generate call whose first response has arrived. Iterate it
    for every response (the first included); failures raise GatewayError.
    cancel() ends the call, freeing the engine's slot; it is safe to call at
    any time, also after the stream finished."""

    def __init__(self, call: grpc.aio.UnaryStreamCall, first: generate_pb2.GenerateResponse,
                 request: generate_pb2.GenerateRequest, address: str, timeout_s: float):
        self._call = call
        self.first = first
        self._request = request
        self.address = address
        self._timeout_s = timeout_s

    def cancel(self) -> None:
        self._call.cancel()

    def _error(self, exc: grpc.aio.AioRpcError) -> GatewayError:
        return from_agent_error(exc.code(), exc.details(), model=self._request.model,
                                request_id=self._request.request_id, timeout_s=self._timeout_s,
                                retry_after_s=retry_after_of(exc.trailing_metadata()))

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
                    raise self._error(exc) from None
                if response is grpc.aio.EOF:
                    raise InternalError(f"request {self._request.request_id}: the agent at {self.address} "
                                        "ended the stream without a finish reason")
        finally:
            self.cancel()  # a no-op when the call is complete


class Relay:
    def __init__(self, router: Router, timeout_s: float, cold_start: ColdStart | None = None):
        self.router = router
        self.timeout_s = timeout_s
        self.cold_start = cold_start  # None: a model without a live replica fails at once

    async def open(self, request: generate_pb2.GenerateRequest) -> AgentStream:
        """Raises GatewayError (ModelNotFound, ModelUnavailable, InvalidRequest, ...).
        A model without a live replica is waited for first (cold start)."""
        if self.cold_start is not None:
            candidates = await self.cold_start.candidates(request.model)
        else:
            candidates = self.router.candidates(request.model)
        deadline = time.monotonic() + self.timeout_s
        unreachable: list[str] = []
        for address in candidates:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            call = self.router.stub(address).Generate(
                request, timeout=remaining, metadata=((HEADER, request.request_id),))
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    log.warning("agent at %s unavailable for %s: %s", address, request.model, exc.details())
                    unreachable.append(f"agent at {address}: {exc.details()}")
                    continue
                raise from_agent_error(exc.code(), exc.details(), model=request.model,
                                       request_id=request.request_id, timeout_s=self.timeout_s,
                                       retry_after_s=retry_after_of(exc.trailing_metadata())) from None
            except BaseException:  # our caller was cancelled (its client left): end the call too
                call.cancel()
                raise
            if first is grpc.aio.EOF:
                raise InternalError(f"request {request.request_id}: the agent at {address} "
                                    "ended the stream without any response")
            return AgentStream(call, first, request, address, self.timeout_s)
        if not unreachable:
            raise from_agent_error(grpc.StatusCode.DEADLINE_EXCEEDED, None, model=request.model,
                                   request_id=request.request_id, timeout_s=self.timeout_s)
        raise ModelUnavailable(f"model {request.model!r} has no live replica ({'; '.join(unreachable)})")
