"""Requests that do not parse are answered INVALID_ARGUMENT.

gRPC's Python server parses each request with the method's deserializer
before any servicer code runs. A DecodeError there (bytes that are not the
message, a string field that is not UTF-8) ended the call as UNKNOWN
"Unexpected <class 'google.protobuf.message.DecodeError'>", a code that
blames the server for the client's bytes. `add_servicer` registers a
servicer through its generated add_*_to_server with each unary-request
method's deserializer made lenient: a request that does not parse becomes
an `Undecodable`, which a guard in front of the servicer's method answers
with INVALID_ARGUMENT; the servicer never sees it."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import aclosing
from typing import Any

import grpc
from google.protobuf.message import DecodeError


class Undecodable:
    """Stands for a request whose bytes did not parse."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


def _lenient(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return Undecodable(str(exc))

    return parse


async def _refuse(request: Undecodable, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request does not parse: {request.reason}")


def _guarded(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The handler with a lenient deserializer and a guard refusing what it could not parse."""
    if handler.request_streaming or handler.request_deserializer is None:
        return handler
    if handler.response_streaming:
        inner_stream = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext):
            if isinstance(request, Undecodable):
                await _refuse(request, context)
            async with aclosing(inner_stream(request, context)) as responses:
                async for response in responses:
                    yield response

        return handler._replace(request_deserializer=_lenient(handler.request_deserializer), unary_stream=unary_stream)
    inner_unary = handler.unary_unary

    async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await _refuse(request, context)
        return await inner_unary(request, context)

    return handler._replace(request_deserializer=_lenient(handler.request_deserializer), unary_unary=unary_unary)


class _Registrar:
    """Stands in for the server in a generated add_*_to_server and registers its handlers, guarded."""

    def __init__(self, server: grpc.aio.Server):
        self._server = server
        self.registered = False

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the generated code passes the same handlers by name next, where they are guarded

    def add_registered_method_handlers(self, service_name: str, method_handlers: dict[str, Any]) -> None:
        guarded = {name: _guarded(handler) for name, handler in method_handlers.items()}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service_name, guarded),))
        self._server.add_registered_method_handlers(service_name, guarded)
        self.registered = True


def add_servicer(add_to_server: Callable[[Any, Any], None], servicer: Any, server: grpc.aio.Server) -> None:
    """add_to_server(servicer, server), e.g. agent_pb2_grpc.add_AgentServicer_to_server, with the
    servicer's unary-request methods answering undecodable requests INVALID_ARGUMENT."""
    registrar = _Registrar(server)
    add_to_server(servicer, registrar)
    if not registrar.registered:
        raise RuntimeError(f"{add_to_server.__name__} registered no method handlers by name")
