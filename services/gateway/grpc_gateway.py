"""The prism.v1.Gateway gRPC service: the REST API's operations for gRPC
clients. Generate validates the request, routes it like REST does and
relays the agent's stream; failures end the call with the same codes the
agent would use (NOT_FOUND, UNAVAILABLE, INVALID_ARGUMENT, ...). The request
id goes back as `x-request-id` metadata, initial and trailing, so a client
knows it even for a call that fails before any response.

API keys come as `authorization: Bearer <key>` metadata; the access checks
(services/gateway/access.py) run before anything reaches the relay, as in
the REST API. A refused rate carries `retry-after` trailing metadata."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from prism_client.v1 import gateway_pb2, gateway_pb2_grpc, generate_pb2
from services.common.grpc_decode import add_servicer
from services.common.grpc_util import RETRY_AFTER_KEY
from services.common.logs import request_id_var
from services.gateway.access import GRPC, AccessControl, Client
from services.gateway.errors import ClientGone, GatewayError, InternalError
from services.gateway.limits import StreamSlot
from services.gateway.metrics import UNKNOWN_MODEL, GatewayMetrics
from services.gateway.relay import AgentStream, Relay
from services.gateway.request_ids import HEADER, choose_request_id, prefix_for
from services.gateway.router import Router
from services.gateway.validation import validate_generate_request

log = logging.getLogger(__name__)

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name
API = "grpc"
AUTHORIZATION_KEY = "authorization"

Metadata = tuple[tuple[str, str], ...]


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    return next((value for key, value in context.invocation_metadata() or () if key == AUTHORIZATION_KEY), None)


async def _abort(context: grpc.aio.ServicerContext, error: GatewayError, metadata: Metadata) -> None:
    if error.retry_after_s is not None:
        metadata = (*metadata, (RETRY_AFTER_KEY, str(error.retry_after_s)))
    await context.abort(error.grpc_code, error.message, trailing_metadata=metadata)


class GatewayService(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, router: Router, relay: Relay, metrics: GatewayMetrics, access: AccessControl):
        self.router = router
        self.relay = relay
        self.metrics = metrics
        self.access = access

    def _admit(self, context: grpc.aio.ServicerContext) -> Client:
        """The caller, once its key and rate allow the call; raises GatewayError."""
        client = self.access.authenticate(_authorization(context), GRPC)
        self.access.admit(client, GRPC)
        return client

    async def Generate(
        self, request: generate_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        request_id = choose_request_id(request.request_id, prefix_for(request))
        request.request_id = request_id
        request_id_var.set(request_id)
        metadata = ((HEADER, request_id),)
        await context.send_initial_metadata(metadata)
        context.set_trailing_metadata(metadata)
        try:  # refused before the tracker, as the REST access middleware refuses before the route
            client = self._admit(context)
            # gRPC's own limit is the largest any client has; this is the caller's.
            self.access.check_size(client, request.ByteSize(), GRPC)
        except GatewayError as error:
            log.info("generate model=%r refused: %s %s", request.model, error.grpc_code.name, error.message)
            await _abort(context, error, metadata)
        model = request.model
        tracker = self.metrics.track(API, model if self.router.has_model(model) else UNKNOWN_MODEL)
        stream: AgentStream | None = None
        slot: StreamSlot | None = None
        failure: GatewayError | None = None
        try:
            validate_generate_request(request)
            self.access.check_generate(client, request, GRPC)
            slot = self.access.open_stream(client, GRPC)
            stream = await self.relay.open(request)
            async for piece in stream:
                tracker.tokens(len(piece.token_ids))
                piece.request_id = request_id
                yield piece
            tracker.finish(200)
        except GatewayError as error:
            failure = error
        except (asyncio.CancelledError, GeneratorExit):  # the client cancelled or went away (GeneratorExit:
            # grpc.aio closes this generator where it waits at a yield, when the cancel came as it sent)
            tracker.finish(ClientGone.http_status)
            raise
        except Exception as exc:
            log.exception("generate failed in the gateway")
            failure = InternalError(f"request {request_id} failed in the gateway: {exc}")
        finally:
            if stream is not None:
                stream.cancel()
            if slot is not None:  # every end: complete, failed, cancelled
                slot.release()
        if failure is not None:
            log.info("generate model=%r failed: %s %s", model, failure.grpc_code.name, failure.message)
            tracker.finish(failure.http_status)
            await _abort(context, failure, metadata)

    async def ListModels(
        self, request: gateway_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListModelsResponse:
        try:
            client = self._admit(context)
            models = [m for m in self.router.list_models() if client.may_use(m.name)]
        except GatewayError as error:
            await _abort(context, error, ())
        return gateway_pb2.ListModelsResponse(
            models=[
                gateway_pb2.ModelInfo(name=m.name, available=m.available, max_context=m.max_context) for m in models
            ]
        )


def add_gateway_service(
    server: grpc.aio.Server, router: Router, relay: Relay, metrics: GatewayMetrics, access: AccessControl
) -> None:
    # A request that does not parse is INVALID_ARGUMENT (not gRPC's UNKNOWN): services/common/grpc_decode.py.
    add_servicer(gateway_pb2_grpc.add_GatewayServicer_to_server, GatewayService(router, relay, metrics, access), server)
