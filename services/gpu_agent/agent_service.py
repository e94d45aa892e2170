"""The agent's gRPC service: Generate for the gateway, life-cycle commands for
the scheduler. It translates between protobuf and the engine manager and maps
every failure to a gRPC status code."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Mapping
from contextlib import aclosing
from pathlib import Path

import grpc

from prism_client.v1 import agent_pb2, agent_pb2_grpc, generate_pb2
from services.common.grpc_util import DRAINING_KEY, RETRY_AFTER_KEY
from services.common.logs import request_id_var
from services.gpu_agent.admission import AgentAdmission, ShedError, started_by
from services.gpu_agent.engine import (
    CapacityError,
    EngineError,
    EngineInactiveError,
    InvalidRequestError,
)
from services.gpu_agent.engine_manager import (
    DrainingError,
    EngineManager,
    EngineNotReadyError,
    EngineSpec,
    ManagedEngine,
    ModelNotLoadedError,
    PlacementError,
)
from services.gpu_agent.model_roots import refusal
from services.gpu_agent.slo import (
    DEFAULT_PRIORITY,
    DEFAULT_TPOT_MS,
    DEFAULT_TTFT_MS,
    ModelSlo,
)
from services.gpu_agent.status_report import (
    AdmissionQueueView,
    MemorySplitSource,
    demand_by_model,
    fill_model_serving,
    gpu_memory_proto,
    memory_splits,
)
from services.gpu_agent.workers.wire import output_to_proto, to_generation_request

# Longer than a load report or two takes to reach the scheduler, so its view of demand has caught up.
DEFAULT_BUSY_WINDOW_S = 10.0

log = logging.getLogger(__name__)

# The gateway sends only request ids that are one visible-ASCII token (services/gateway/request_ids.py).
# Another caller's id would go into every log line of its request as it is, where a newline forges
# lines; the agent replaces it.
_LOGGABLE_ID = re.compile(r"[\x21-\x7e]{1,128}")


def loggable_request_id(request_id: str) -> str:
    """`request_id`, or a fresh one in its place when it is not one visible-ASCII token (empty stays empty)."""
    if not request_id or _LOGGABLE_ID.fullmatch(request_id):
        return request_id
    replacement = f"agent-{uuid.uuid4().hex}"
    log.warning("request id %r is not one visible-ASCII token: the request goes by %s", request_id[:200], replacement)
    return replacement


STATE_TO_PROTO = {
    "loading": agent_pb2.ENGINE_STATE_LOADING,
    "active": agent_pb2.ENGINE_STATE_ACTIVE,
    "inactive": agent_pb2.ENGINE_STATE_INACTIVE,
    "failed": agent_pb2.ENGINE_STATE_FAILED,
    "draining": agent_pb2.ENGINE_STATE_DRAINING,
}


def engine_status(
    managed: ManagedEngine, *, admission: AdmissionQueueView | None = None, demand_bytes: dict[str, int] | None = None
) -> agent_pb2.EngineStatus:
    """admission and demand_bytes (model -> KV demand, from the memory
    coordinators) fill admission_queued and kv_demand_bytes; the serving
    stats come from the engine's own request stats."""
    status = agent_pb2.EngineStatus(
        model=managed.spec.name,
        gpu_ids=list(managed.gpu_ids),
        state=STATE_TO_PROTO.get(managed.published_state, agent_pb2.ENGINE_STATE_UNSPECIFIED),
        error=managed.error,
        memory_limit_bytes=managed.memory_limit_bytes,
    )
    status.priority = managed.slo.priority
    fill_model_serving(status, managed, admission=admission, demand_bytes=demand_bytes or {})
    if managed.engine is not None:
        stats = managed.engine.stats()
        status.kv_used_bytes = stats.kv_used_bytes
        status.weight_bytes = stats.weight_bytes
        status.running_requests = stats.running_requests
        status.queued_requests = stats.queued_requests
        status.max_context = managed.engine.max_context
        path = managed.engine.serving_path
        status.kv_pool, status.attention, status.cuda_graphs = path.kv_pool, path.attention, path.cuda_graphs
        status.kv_mapped_bytes = stats.kv_mapped_bytes
        status.kv_free_tokens = stats.kv_free_tokens
        status.memory_limit_revision = stats.memory_limit_revision
        status.memory_limit_status = stats.memory_limit_status
        status.memory_limit_bytes = stats.memory_limit_bytes
        status.kv_cached_bytes = stats.kv_cached_bytes
        status.prefix_cache_queried_tokens = stats.prefix_cache_queried_tokens
        status.prefix_cache_hit_tokens = stats.prefix_cache_hit_tokens
    return status


def slo_from_proto(spec: agent_pb2.ModelSpec) -> ModelSlo:
    """The spec's SLO, the agent's defaults where it leaves a field unset (0)."""
    return ModelSlo(
        ttft_ms=spec.slo.ttft_ms or DEFAULT_TTFT_MS,
        tpot_ms=spec.slo.tpot_ms or DEFAULT_TPOT_MS,
        priority=spec.priority or DEFAULT_PRIORITY,
        shed_load=spec.shed_load,
    )


class AgentService(agent_pb2_grpc.AgentServicer):
    def __init__(
        self,
        agent_id: str,
        devices,
        manager: EngineManager,
        *,
        coordinators: Mapping[int, MemorySplitSource] | None = None,
        admission: AgentAdmission | None = None,
        busy_window_s: float = DEFAULT_BUSY_WINDOW_S,
        model_roots: tuple[Path, ...] = (),
    ):
        """The agent's gRPC service (prism.v1.Agent) over its engines.

        Args:
            agent_id: the agent's id, as its etcd records and the scheduler's placements name it.
            devices: the agent's devices (devices.py), which GetStatus reports.
            manager: the engines (engine_manager.py) that LoadModel, Generate and the others act on.
            coordinators: device index -> its memory coordinator, whose split GetStatus reports; without
                them it stays empty.
            admission: the admission queue, whose numbers GetStatus reports and through which Generate
                admits requests; without it, requests go straight to their engines.
            busy_window_s: an engine that had a request this recently is not switched off unless forced.
            model_roots: the folders LoadModel may load from (model_roots.py); none: any.
        """
        self.agent_id = agent_id
        self.devices = devices
        self.manager = manager
        self.coordinators = coordinators
        self.admission = admission
        self.busy_window_s = busy_window_s
        self.model_roots = model_roots

    async def _managed(self, model: str, context: grpc.aio.ServicerContext, *, ready: bool = True) -> ManagedEngine:
        try:
            return self.manager.ready(model) if ready else self.manager.get(model)
        except ModelNotLoadedError as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except EngineNotReadyError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        raise AssertionError("unreachable")

    async def Generate(
        self, request: generate_pb2.GenerateRequest, context
    ) -> AsyncIterator[generate_pb2.GenerateResponse]:
        request.request_id = loggable_request_id(request.request_id)
        request_id_var.set(request.request_id or "-")
        arrival = time.monotonic()
        managed = await self._managed(request.model, context)
        stats = managed.request_stats
        stats.arrived()
        try:  # in flight (the busy fraction) until it ends, whichever way
            async with aclosing(self._generate(request, context, managed, arrival)) as responses:
                async for response in responses:
                    yield response
        finally:
            stats.ended()

    async def _generate(
        self, request: generate_pb2.GenerateRequest, context, managed: ManagedEngine, arrival: float
    ) -> AsyncGenerator[generate_pb2.GenerateResponse, None]:
        stats = managed.request_stats
        if managed.state == "inactive":  # the first request for a switched-off model brings it back
            await self._activate(request.model, context)
        req = to_generation_request(request)
        log.info("generate model=%s", request.model)
        ticket = None
        first_token_at = None
        completion_tokens = 0
        try:
            queue = self.admission.queue_for(managed) if self.admission is not None else None
            if queue is not None:
                ticket = await queue.admit(managed, managed.started_engine.count_prompt_tokens(req))
            outputs = managed.started_engine.generate(req)
            if managed.slo.shed_load:
                outputs = started_by(outputs, arrival + managed.slo.ttft_s, request.model, managed.slo.ttft_ms, arrival)
            async for out in outputs:
                if first_token_at is None and (out.token_ids or out.finish_reason):
                    first_token_at = time.monotonic()
                    if ticket is not None:
                        ticket.started()
                completion_tokens = out.completion_tokens
                if out.finish_reason is not None:
                    # Set above by this output at the latest: its finish reason ("stop" or "length") is not empty.
                    assert first_token_at is not None
                    # Recorded before the last yield: the gateway cancels the call once it has the
                    # final response, so code after the loop may never run.
                    tpot = (
                        (time.monotonic() - first_token_at) / (completion_tokens - 1) if completion_tokens > 1 else None
                    )
                    stats.finished(first_token_at - arrival, tpot, out.prompt_tokens, completion_tokens)
                yield output_to_proto(out, request.request_id, usage_at_end_only=True)
        except InvalidRequestError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except ShedError as exc:
            stats.shed()
            log.info("shed: %s", exc)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                str(exc),
                trailing_metadata=((RETRY_AFTER_KEY, str(exc.retry_after_s)),),
            )
        except CapacityError as exc:
            stats.failed()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except DrainingError as exc:  # not started: the gateway gives it to another replica
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc), trailing_metadata=((DRAINING_KEY, "1"),))
        except (EngineInactiveError, EngineNotReadyError) as exc:
            stats.failed()
            if isinstance(exc, EngineInactiveError) and managed.switched_off_why:  # for busier engines' KV
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, managed.switched_off_why)
            await context.abort(grpc.StatusCode.UNAVAILABLE, managed.unload_reason or str(exc))
        except EngineError as exc:
            stats.failed()
            if managed.unload_reason:  # a drain timed out: the engine was stopped under the request
                log.warning("request %s ended unfinished: %s", request.request_id, managed.unload_reason)
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE, f"request {request.request_id}: {managed.unload_reason}"
                )
            log.error("engine failure: %s", exc)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"engine for {request.model!r} failed on request {request.request_id}: {exc}"
            )
        finally:
            if ticket is not None:
                ticket.release()

    async def GetStatus(self, request, context) -> agent_pb2.AgentStatus:
        splits = memory_splits(self.coordinators)
        demand = demand_by_model(splits)
        return agent_pb2.AgentStatus(
            agent_id=self.agent_id,
            devices=[
                agent_pb2.Device(index=d.index, kind=d.kind, name=d.name, memory_bytes=d.memory_bytes)
                for d in self.devices
            ],
            engines=[
                engine_status(m, admission=self.admission, demand_bytes=demand) for m in self.manager.engines.values()
            ],
            gpus=[gpu_memory_proto(s) for s in splits],
        )

    async def LoadModel(self, request: agent_pb2.LoadModelRequest, context) -> agent_pb2.EngineStatus:
        s = request.spec
        if not s.name or not s.path:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "spec.name and spec.path are required")
        if s.slo.ttft_ms < 0 or s.slo.tpot_ms < 0 or s.priority < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "spec.slo and spec.priority must not be negative")
        if (why := refusal(s.path, self.model_roots)) is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{s.name}: {why}")
        spec = EngineSpec(
            name=s.name,
            path=s.path,
            tp_size=s.tp_size or 1,
            load_format=s.load_format or "auto",
            engine=s.engine or "auto",
            dtype=s.dtype or "auto",
            seed=s.seed,
            slo=slo_from_proto(s),
            max_context=s.max_context,
            deterministic_inference=s.deterministic_inference,
            prefix_caching=not s.no_prefix_caching,
        )
        try:
            managed = await self.manager.load(
                spec, tuple(request.gpu_ids), request.activate, request.memory_limit_bytes
            )
        except PlacementError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except CapacityError as exc:  # loaded, but no room to switch it on: the scheduler retries later
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        return engine_status(managed)

    async def UnloadModel(self, request: agent_pb2.ModelRequest, context) -> agent_pb2.EngineStatus:
        """Drains the engine (returns at once, DRAINING while requests are in
        flight); with force, unloads it at once."""
        await self._managed(request.model, context, ready=False)
        if request.force:
            return engine_status(await self.manager.unload(request.model))
        managed = await self.manager.drain(request.model)
        if self.admission is not None:  # what waits to go into the engine goes back to the gateway at once
            self.admission.send_back_unstarted(
                managed,
                (
                    f"model {request.model!r} is draining on agent {self.agent_id} (being unloaded): the request had "
                    "not started; sent back for another replica"
                ),
            )
        return engine_status(managed)

    @staticmethod
    async def _engine_call(
        context: grpc.aio.ServicerContext, call: Awaitable[ManagedEngine], failure: str
    ) -> ManagedEngine:
        """Awaits a manager call that drives an engine; an engine that failed
        meanwhile is UNAVAILABLE, one that cannot get the memory now (its weights
        do not fit beside the busy engines) RESOURCE_EXHAUSTED, an engine error
        INTERNAL ("<failure>: <error>")."""
        try:
            return await call
        except EngineNotReadyError as exc:  # it failed meanwhile
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except CapacityError as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{failure}: {exc}")
        except EngineError as exc:
            await context.abort(grpc.StatusCode.INTERNAL, f"{failure}: {exc}")
        raise AssertionError("unreachable")

    async def _activate(self, model: str, context: grpc.aio.ServicerContext) -> ManagedEngine:
        return await self._engine_call(context, self.manager.activate(model), f"activating {model!r} failed")

    async def ActivateModel(self, request: agent_pb2.ModelRequest, context) -> agent_pb2.EngineStatus:
        await self._managed(request.model, context)
        return engine_status(await self._activate(request.model, context))

    async def DeactivateModel(self, request: agent_pb2.ModelRequest, context) -> agent_pb2.EngineStatus:
        managed = await self._managed(request.model, context)
        window_s = request.busy_window_s if request.busy_window_s > 0 else self.busy_window_s
        if not request.force and managed.state == "active" and self._busy(managed, window_s):
            log.info("not deactivating %s: it has requests, or had one in the last %.0fs", request.model, window_s)
            return engine_status(managed)
        return engine_status(
            await self._engine_call(
                context, self.manager.deactivate(request.model), f"deactivating {request.model!r} failed"
            )
        )

    def _busy(self, managed: ManagedEngine, window_s: float) -> bool:
        """A request running or waiting in it, or one arrived within window_s."""
        stats = managed.started_engine.stats()
        queued = self.admission.queued(managed.spec.name) if self.admission is not None else 0
        return (
            stats.running_requests + stats.queued_requests + queued > 0
            or managed.request_stats.in_flight > 0
            or managed.request_stats.idle_s() < window_s
        )

    async def SetMemoryLimit(self, request: agent_pb2.SetMemoryLimitRequest, context) -> agent_pb2.EngineStatus:
        await self._managed(request.model, context)
        if request.memory_limit_bytes <= 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "memory_limit_bytes must be positive")
        call = self.manager.set_memory_limit(request.model, request.memory_limit_bytes, request.revision)
        return engine_status(await self._engine_call(context, call, f"engine for {request.model!r}"))
