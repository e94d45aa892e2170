"""The EngineWorker gRPC service inside a worker process: holds at most one
Engine and exposes its API. Engine errors travel as gRPC status codes
(wire.ERROR_TO_CODE); the agent's RemoteEngine turns them back.

A worker loaded as rank 1 or more of a tensor-parallel model holds a
ShardFollower instead: it runs rank 0's steps on a thread of its own until
rank 0's engine stops, and takes no requests itself.

A step that fails on any rank of a split model ends that rank's worker
(EXIT_SPLIT_STEP_FAILED): the others are left inside the step's collectives,
which fail once a peer's process has gone (and the agent ends them too)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

import grpc
import torch

from prism_client.v1 import engine_worker_pb2 as wpb
from prism_client.v1 import engine_worker_pb2_grpc, generate_pb2
from services.common.logs import request_id_var
from services.gpu_agent.engine import Engine, EngineError
from services.gpu_agent.engine.shard_follower import ShardFollower, StepChannel, join_ranks
from services.gpu_agent.engine.tensor_parallel import SINGLE
from services.gpu_agent.workers import wire
from services.gpu_agent.workers.device_warmup import WarmupReport
from services.gpu_agent.workers.errors import EXIT_SPLIT_STEP_FAILED

log = logging.getLogger(__name__)


def device_used_bytes(device: str) -> int:
    """The CUDA device's memory in use by every process (total less free); 0 for the CPU."""
    if not device.startswith("cuda"):
        return 0
    free, total = torch.cuda.mem_get_info(torch.device(device))
    return total - free


# Rank 0's worker ends this long after its split engine failed: its requests' errors go out first.
SPLIT_FAILURE_EXIT_DELAY_S = 0.5


def end_process(code: int) -> None:
    """Ends this worker at once (no cleanup: its peers' collectives and the agent need it gone)."""
    logging.shutdown()
    os._exit(code)


class EngineWorkerService(engine_worker_pb2_grpc.EngineWorkerServicer):
    def __init__(self, device: str, warmup: WarmupReport, import_s: float, on_shutdown: Callable[[], None]):
        self.device = device
        self.warmup = warmup
        self.import_s = import_s
        self.engine: Engine | None = None
        self.follower: ShardFollower | None = None  # a tensor-parallel rank other than 0
        self._on_shutdown = on_shutdown
        self._load_lock = asyncio.Lock()

    async def _engine(self, context: grpc.aio.ServicerContext) -> Engine:
        if self.follower is not None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"worker {os.getpid()} is tensor-parallel rank {self.follower.tp.rank} of a model: "
                "its rank 0's worker takes the requests",
            )
        if self.engine is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"worker {os.getpid()} has no model loaded")
            raise AssertionError("unreachable: abort() raises")
        return self.engine

    async def _abort_with(self, context: grpc.aio.ServicerContext, exc: EngineError) -> NoReturn:
        await context.abort(wire.status_code_of(exc), str(exc))
        raise AssertionError("unreachable: abort() raises")

    async def Info(self, request, context) -> wpb.WorkerInfo:
        return wpb.WorkerInfo(
            pid=os.getpid(),
            device=self.device,
            warmup_s=self.warmup.seconds,
            import_s=self.import_s,
            model_loaded=self.engine is not None or self.follower is not None,
            model=self.engine.name if self.engine is not None else "",
        )

    async def Load(self, spec: wpb.EngineLoadSpec, context) -> wpb.LoadReply:
        async with self._load_lock:
            if self.engine is not None or self.follower is not None:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"worker {os.getpid()} holds a model already (one engine a worker)",
                )
            start = time.perf_counter()
            if spec.HasField("tensor_parallel") and spec.tensor_parallel.rank > 0:
                return await self._follow(spec, context, start)
            try:
                self.engine = await asyncio.to_thread(self._build, spec)
            except EngineError as exc:
                log.error("loading %s failed: %s", spec.path, exc)
                await self._abort_with(context, exc)
            load_s = time.perf_counter() - start
            return wpb.LoadReply(
                weight_bytes=self.engine.weight_bytes,
                max_context=self.engine.max_context,
                load_s=load_s,
                device=self.engine.device,
                kv_bytes_per_token=self.engine.kv_bytes_per_token,
                kv_bundle_bytes=self.engine.kv_bundle_bytes,
                weights_attached=self.engine.weights_attached,
                weights_shared=self.engine.weights_shared,
                kv_pool=self.engine.serving_path.kv_pool,
                attention=self.engine.serving_path.attention,
                cuda_graphs=self.engine.serving_path.cuda_graphs,
            )

    async def _follow(self, spec: wpb.EngineLoadSpec, context, start: float) -> wpb.LoadReply:
        """Rank 1 or more: loads the shard, then follows rank 0 on a thread of its own."""
        tp_spec = spec.tensor_parallel
        try:
            follower, channel = await asyncio.to_thread(self._build_follower, spec)
        except Exception as exc:  # noqa: BLE001  reported to the agent as a failed load
            log.error("loading rank %d of %s failed: %s", tp_spec.rank, spec.path, exc)
            await self._abort_with(
                context, EngineError(f"cannot load rank {tp_spec.rank} of {spec.path}: {type(exc).__name__}: {exc}")
            )
        self.follower = follower
        threading.Thread(
            target=self._run_follower, args=(follower, channel), name="shard-follower", daemon=True
        ).start()
        return wpb.LoadReply(
            weight_bytes=follower.weight_bytes,
            load_s=time.perf_counter() - start,
            device=str(follower.device),
            kv_bytes_per_token=follower.geometry.token_bytes,
        )

    def _build_follower(self, spec: wpb.EngineLoadSpec) -> tuple[ShardFollower, StepChannel]:
        tp, channel = join_ranks(
            spec.tensor_parallel.rank, spec.tensor_parallel.size, spec.tensor_parallel.rendezvous, self.device
        )
        return ShardFollower(
            Path(spec.path), tp, spec.dtype or "auto", spec.load_format or "auto", torch.device(self.device), spec.seed
        ), channel

    def _run_follower(self, follower: ShardFollower, channel: StepChannel) -> None:
        try:
            follower.run(channel)
        except Exception:  # a failed step, or rank 0 gone: this rank can do nothing more
            log.exception(
                "tensor-parallel rank %d of %d: its step failed, or rank 0 went; ending this worker",
                follower.tp.rank,
                follower.tp.size,
            )
            end_process(EXIT_SPLIT_STEP_FAILED)

    def _build(self, spec: wpb.EngineLoadSpec) -> Engine:
        tp, channel = SINGLE, None
        if spec.HasField("tensor_parallel") and spec.tensor_parallel.size > 1:
            tp, channel = join_ranks(0, spec.tensor_parallel.size, spec.tensor_parallel.rendezvous, self.device)
        try:
            engine = Engine(
                spec.path,
                name=spec.name or None,
                load_format=spec.load_format or "auto",
                dtype=spec.dtype or "auto",
                device=self.device,
                seed=spec.seed,
                memory_limit_bytes=spec.memory_limit_bytes or None,
                kv_capacity_bytes=spec.kv_capacity_bytes or None,
                shared_weights_path=spec.shared_weights_path or None,
                max_context=spec.max_context or None,
                tensor_parallel=tp,
                step_channel=channel,
                kv_pool="pages" if channel is not None else "auto",
                step_board=(spec.step_board_path, spec.step_board_slot) if spec.step_board_path else None,
                prefix_caching=not spec.no_prefix_caching,
                on_split_failure=self._split_engine_failed if channel is not None else None,
            )
        except EngineError:
            raise
        except Exception as exc:  # the engine wraps its own failures; anything else still means "cannot load"
            raise EngineError(f"cannot load {spec.path}: {type(exc).__name__}: {exc}") from exc
        engine.start()
        return engine

    def _split_engine_failed(self, why: str) -> None:
        """From rank 0's step thread, once every request has its error: ends this worker after a moment,
        so the errors reach the agent first (its requests end with them, not with the worker's loss)."""
        log.error("ending this worker in %.1fs: %s", SPLIT_FAILURE_EXIT_DELAY_S, why)
        timer = threading.Timer(SPLIT_FAILURE_EXIT_DELAY_S, end_process, args=(EXIT_SPLIT_STEP_FAILED,))
        timer.daemon = True
        timer.start()

    async def Generate(
        self, request: generate_pb2.GenerateRequest, context
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        request_id_var.set(request.request_id or "-")
        engine = await self._engine(context)
        try:
            # Closing the engine's stream (on the agent cancelling the call, which
            # cancels this generator) aborts the request and frees its KV at once.
            outputs = engine.generate(wire.to_generation_request(request))
            # An async generator (annotated AsyncIterator): closable, which is what aclosing needs.
            assert isinstance(outputs, AsyncGenerator)
            async with contextlib.aclosing(outputs) as stream:
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
        return wire.stats_to_proto(
            replace(engine.stats(), device_used_bytes=device_used_bytes(self.device)), engine.active
        )

    async def Shutdown(self, request, context) -> wpb.ShutdownReply:
        log.info("shutdown requested")
        # After this reply is sent: the main loop stops the server and the engine.
        asyncio.get_running_loop().call_soon(self._on_shutdown)
        return wpb.ShutdownReply()

    def stop_engine(self) -> None:
        if self.engine is not None:
            self.engine.stop()
