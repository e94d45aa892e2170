"""The EngineWorker gRPC service inside a worker process: holds at most one
Engine and exposes its API. Engine errors travel as gRPC status codes
(wire.ERROR_TO_CODE); the agent's RemoteEngine turns them back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable

import grpc

from prism.v1 import engine_worker_pb2 as wpb
from prism.v1 import engine_worker_pb2_grpc, generate_pb2
from services.common.logs import request_id_var
from services.gpu_agent.engine import Engine, EngineError
from services.gpu_agent.workers import wire
from services.gpu_agent.workers.device_warmup import WarmupReport

log = logging.getLogger(__name__)


class EngineWorkerService(engine_worker_pb2_grpc.EngineWorkerServicer):
    def __init__(self, device: str, warmup: WarmupReport, import_s: float, on_shutdown: Callable[[], None]):
        self.device = device
        self.warmup = warmup
        self.import_s = import_s
        self.engine: Engine | None = None
        self._on_shutdown = on_shutdown
        self._load_lock = asyncio.Lock()

    async def _engine(self, context: grpc.aio.ServicerContext) -> Engine:
        if self.engine is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"worker {os.getpid()} has no model loaded")
        return self.engine

    async def _abort_with(self, context: grpc.aio.ServicerContext, exc: EngineError) -> None:
        await context.abort(wire.status_code_of(exc), str(exc))

    async def Info(self, request, context) -> wpb.WorkerInfo:
        return wpb.WorkerInfo(pid=os.getpid(), device=self.device, warmup_s=self.warmup.seconds,
                              import_s=self.import_s, model_loaded=self.engine is not None,
                              model=self.engine.name if self.engine is not None else "")

    async def Load(self, spec: wpb.EngineLoadSpec, context) -> wpb.LoadReply:
        async with self._load_lock:
            if self.engine is not None:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"worker {os.getpid()} holds {self.engine.name!r} already (one engine a worker)")
            start = time.perf_counter()
            try:
                self.engine = await asyncio.to_thread(self._build, spec)
            except EngineError as exc:
                log.error("loading %s failed: %s", spec.path, exc)
                await self._abort_with(context, exc)
            load_s = time.perf_counter() - start
            return wpb.LoadReply(weight_bytes=self.engine.weight_bytes, max_context=self.engine.max_context,
                                 load_s=load_s, device=self.engine.device,
                                 kv_bytes_per_token=self.engine.kv_bytes_per_token,
                                 kv_bundle_bytes=self.engine.kv_bundle_bytes,
                                 weights_attached=self.engine.weights_attached,
                                 weights_shared=self.engine.weights_shared)

    def _build(self, spec: wpb.EngineLoadSpec) -> Engine:
        try:
            engine = Engine(spec.path, name=spec.name or None, load_format=spec.load_format or "auto",
                            dtype=spec.dtype or "auto", device=self.device, seed=spec.seed,
                            memory_limit_bytes=spec.memory_limit_bytes or None,
                            kv_capacity_bytes=spec.kv_capacity_bytes or None,
                            shared_weights_path=spec.shared_weights_path or None,
                            max_context=spec.max_context or None)
        except EngineError:
            raise
        except Exception as exc:  # the engine wraps its own failures; anything else still means "cannot load"
            raise EngineError(f"cannot load {spec.path}: {type(exc).__name__}: {exc}") from exc
        engine.start()
        return engine

    async def Generate(self, request: generate_pb2.GenerateRequest, context) -> AsyncIterator[generate_pb2.GenerateResponse]:
        request_id_var.set(request.request_id or "-")
        engine = await self._engine(context)
        try:
            # Closing the engine's stream (on the agent cancelling the call, which
            # cancels this generator) aborts the request and frees its KV at once.
            async with contextlib.aclosing(engine.generate(wire.to_generation_request(request))) as stream:
                async for out in stream:
                    yield wire.output_to_proto(out, request.request_id)
        except EngineError as exc:
            await self._abort_with(context, exc)

    async def SetMemoryLimit(self, request: wpb.WorkerSetMemoryLimitRequest, context) -> wpb.MemoryLimitReply:
        engine = await self._engine(context)
        revision = request.revision if request.HasField("revision") else None
        try:
            return wire.limit_to_proto(engine.set_memory_limit(request.memory_limit_bytes, revision))
        except EngineError as exc:
            await self._abort_with(context, exc)

    async def Activate(self, request, context) -> wpb.ActivateReply:
        engine = await self._engine(context)
        try:
            return wire.timing_to_proto(await asyncio.to_thread(engine.activate))
        except EngineError as exc:
            await self._abort_with(context, exc)

    async def Deactivate(self, request, context) -> wpb.DeactivateReply:
        engine = await self._engine(context)
        await asyncio.to_thread(engine.deactivate)
        return wpb.DeactivateReply()

    async def Stats(self, request, context) -> wpb.EngineStatsReply:
        engine = await self._engine(context)
        return wire.stats_to_proto(engine.stats(), engine.active)

    async def Shutdown(self, request, context) -> wpb.ShutdownReply:
        log.info("shutdown requested")
        # After this reply is sent: the main loop stops the server and the engine.
        asyncio.get_running_loop().call_soon(self._on_shutdown)
        return wpb.ShutdownReply()

    def stop_engine(self) -> None:
        if self.engine is not None:
            self.engine.stop()
