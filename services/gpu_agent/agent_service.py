"""The agent's gRPC service: Generate for the gateway, life-cycle commands for
the scheduler. It translates between protobuf and the engine manager and maps
every failure to a gRPC status code."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable

import grpc

from prism.v1 import agent_pb2, agent_pb2_grpc, generate_pb2
from services.common.logs import request_id_var
from services.gpu_agent.engine import (
    CapacityError,
    EngineError,
    EngineInactiveError,
    InvalidRequestError,
)
from services.gpu_agent.engine_manager import (
    EngineManager,
    EngineNotReadyError,
    EngineSpec,
    ManagedEngine,
    ModelNotLoadedError,
    PlacementError,
)
from services.gpu_agent.workers.wire import output_to_proto, to_generation_request

log = logging.getLogger(__name__)

STATE_TO_PROTO = {
    "loading": agent_pb2.ENGINE_STATE_LOADING,
    "active": agent_pb2.ENGINE_STATE_ACTIVE,
    "inactive": agent_pb2.ENGINE_STATE_INACTIVE,
    "failed": agent_pb2.ENGINE_STATE_FAILED,
}


def engine_status(managed: ManagedEngine) -> agent_pb2.EngineStatus:
    status = agent_pb2.EngineStatus(
        model=managed.spec.name,
        gpu_ids=list(managed.gpu_ids),
        state=STATE_TO_PROTO.get(managed.state, agent_pb2.ENGINE_STATE_UNSPECIFIED),
        error=managed.error,
        memory_limit_bytes=managed.memory_limit_bytes,
    )
    if managed.engine is not None:
        stats = managed.engine.stats()
        status.kv_used_bytes = stats.kv_used_bytes
        status.weight_bytes = stats.weight_bytes
        status.running_requests = stats.running_requests
        status.queued_requests = stats.queued_requests
        status.max_context = managed.engine.max_context
        status.kv_mapped_bytes = stats.kv_mapped_bytes
        status.kv_free_tokens = stats.kv_free_tokens
        status.memory_limit_revision = stats.memory_limit_revision
        status.memory_limit_status = stats.memory_limit_status
        status.memory_limit_bytes = stats.memory_limit_bytes
    return status


class AgentService(agent_pb2_grpc.AgentServicer):
    def __init__(self, agent_id: str, devices, manager: EngineManager):
        self.agent_id = agent_id
        self.devices = devices
        self.manager = manager

    async def _managed(self, model: str, context: grpc.aio.ServicerContext, *, ready: bool = True) -> ManagedEngine:
        try:
            return self.manager.ready(model) if ready else self.manager.get(model)
        except ModelNotLoadedError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except EngineNotReadyError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        raise AssertionError("unreachable")

    async def Generate(self, request: generate_pb2.GenerateRequest, context) -> AsyncIterator[generate_pb2.GenerateResponse]:
        request_id_var.set(request.request_id or "-")
        managed = await self._managed(request.model, context)
        managed.arrivals.append(time.monotonic())
        if managed.state == "inactive":  # the first request for a switched-off model brings it back
            await self._activate(request.model, context)
        req = to_generation_request(request)
        log.info("generate model=%s", request.model)
        try:
            async for out in managed.engine.generate(req):
                yield output_to_proto(out, request.request_id, usage_at_end_only=True)
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except CapacityError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except EngineInactiveError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except EngineError as exc:
            log.error("engine failure: %s", exc)
            await context.abort(grpc.StatusCode.INTERNAL, f"engine for {request.model!r} failed on request {request.request_id}: {exc}")

    async def GetStatus(self, request, context) -> agent_pb2.AgentStatus:
        return agent_pb2.AgentStatus(
            agent_id=self.agent_id,
            devices=[agent_pb2.Device(index=d.index, kind=d.kind, name=d.name, memory_bytes=d.memory_bytes) for d in self.devices],
            engines=[engine_status(m) for m in self.manager.engines.values()],
        )

    async def LoadModel(self, request: agent_pb2.LoadModelRequest, context) -> agent_pb2.EngineStatus:
        s = request.spec
        if not s.name or not s.path:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "spec.name and spec.path are required")
        spec = EngineSpec(
            name=s.name, path=s.path, tp_size=s.tp_size or 1, load_format=s.load_format or "auto",
            engine=s.engine or "torch", dtype=s.dtype or "auto", seed=s.seed,
        )
        try:
            managed = await self.manager.load(spec, tuple(request.gpu_ids), request.activate, request.memory_limit_bytes)
        except PlacementError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return engine_status(managed)

    async def UnloadModel(self, request: agent_pb2.ModelRequest, context) -> agent_pb2.EngineStatus:
        await self._managed(request.model, context, ready=False)
        return engine_status(await self.manager.unload(request.model))

    @staticmethod
    async def _engine_call(context: grpc.aio.ServicerContext, call: Awaitable[ManagedEngine],
                           failure: str) -> ManagedEngine:
        """Awaits a manager call that drives an engine; an engine that failed
        meanwhile is UNAVAILABLE, an engine error INTERNAL ("<failure>: <error>")."""
        try:
            return await call
        except EngineNotReadyError as exc:  # it failed meanwhile
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except EngineError as exc:
            await context.abort(grpc.StatusCode.INTERNAL, f"{failure}: {exc}")
        raise AssertionError("unreachable")

    async def _activate(self, model: str, context: grpc.aio.ServicerContext) -> ManagedEngine:
        return await self._engine_call(context, self.manager.activate(model), f"activating {model!r} failed")

    async def ActivateModel(self, request: agent_pb2.ModelRequest, context) -> agent_pb2.EngineStatus:
        await self._managed(request.model, context)
        return engine_status(await self._activate(request.model, context))

    async def DeactivateModel(self, request: agent_pb2.ModelRequest, context) -> agent_pb2.EngineStatus:
        await self._managed(request.model, context)
        return engine_status(await self._engine_call(context, self.manager.deactivate(request.model),
                                                     f"deactivating {request.model!r} failed"))

    async def SetMemoryLimit(self, request: agent_pb2.SetMemoryLimitRequest, context) -> agent_pb2.EngineStatus:
        await self._managed(request.model, context)
        if request.memory_limit_bytes <= 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "memory_limit_bytes must be positive")
        call = self.manager.set_memory_limit(request.model, request.memory_limit_bytes, request.revision)
        return engine_status(await self._engine_call(context, call, f"engine for {request.model!r}"))
