"""The agent's serving numbers and memory split as protobuf, for GetStatus
(AgentStatus, EngineStatus) and the load reports (LoadReport, ModelLoad).

Pure conversions plus the few reads that gather them, so GetStatus and the
load reporter report the same numbers the same way. The memory coordinators
and the admission queue are optional: before they are wired in (or on an
agent without them) the new fields stay at zero and `gpus` empty.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from prism_client.v1 import agent_pb2
from services.gpu_agent.engine_manager import ManagedEngine
from services.gpu_agent.memory_split import DeviceMemorySplit, EngineMemory
from services.gpu_agent.request_stats import ServingSnapshot


class MemorySplitSource(Protocol):
    """A device's memory coordinator, as far as reports need it."""

    def memory_split(self) -> DeviceMemorySplit: ...


class AdmissionQueueView(Protocol):
    """The agent's admission queue, as far as reports need it."""

    def queued(self, model: str) -> int: ...


def serving_stats_proto(snapshot: ServingSnapshot) -> agent_pb2.ServingStats:
    return agent_pb2.ServingStats(
        window_s=snapshot.window_s,
        arrival_rate=snapshot.arrival_rate,
        finished_requests=snapshot.finished_requests,
        ttft_p50_ms=snapshot.ttft_p50_ms,
        ttft_p99_ms=snapshot.ttft_p99_ms,
        tpot_p50_ms=snapshot.tpot_p50_ms,
        tpot_p99_ms=snapshot.tpot_p99_ms,
        slo_attainment=snapshot.slo_attainment,
        shed_requests=snapshot.shed_requests,
        failed_requests=snapshot.failed_requests,
        busy_fraction=snapshot.busy_fraction,
        mean_prompt_tokens=snapshot.mean_prompt_tokens,
        mean_output_tokens=snapshot.mean_output_tokens,
        recent_arrival_rate=snapshot.recent_arrival_rate,
    )


def engine_memory_proto(engine: EngineMemory) -> agent_pb2.EngineMemory:
    return agent_pb2.EngineMemory(
        model=engine.model,
        active=engine.active,
        weight_bytes=engine.weight_bytes,
        kv_limit_bytes=engine.kv_limit_bytes,
        kv_mapped_bytes=engine.kv_mapped_bytes,
        kv_used_bytes=engine.kv_used_bytes,
        kv_demand_bytes=engine.kv_demand_bytes,
        kv_held_bytes=engine.kv_held_bytes,
        kv_cached_bytes=engine.kv_cached_bytes,
    )


def gpu_memory_proto(split: DeviceMemorySplit) -> agent_pb2.GpuMemory:
    return agent_pb2.GpuMemory(
        gpu_id=split.gpu_id,
        total_bytes=split.total_bytes,
        weight_bytes=split.weight_bytes,
        reserve_bytes=split.reserve_bytes,
        kv_budget_bytes=split.kv_budget_bytes,
        kv_limit_bytes=split.kv_limit_bytes,
        kv_mapped_bytes=split.kv_mapped_bytes,
        free_bytes=split.free_bytes,
        engines=[engine_memory_proto(e) for e in split.engines],
    )


def memory_splits(coordinators: Mapping[int, MemorySplitSource] | None) -> list[DeviceMemorySplit]:
    """Every device's split, in device order; none without coordinators."""
    if not coordinators:
        return []
    return [coordinators[gpu_id].memory_split() for gpu_id in sorted(coordinators)]


def demand_by_model(splits: Iterable[DeviceMemorySplit]) -> dict[str, int]:
    """Each engine's KV demand as its coordinator sees it (summed over devices,
    for an engine that would span several)."""
    demand: dict[str, int] = {}
    for split in splits:
        for engine in split.engines:
            demand[engine.model] = demand.get(engine.model, 0) + engine.kv_demand_bytes
    return demand


def fill_model_serving(
    message: agent_pb2.EngineStatus,
    managed: ManagedEngine,
    *,
    admission: AdmissionQueueView | None,
    demand_bytes: Mapping[str, int],
) -> None:
    """Sets the admission, demand and serving fields an EngineStatus and a
    ModelLoad share (same names in both messages) from one ManagedEngine."""
    model = managed.spec.name
    message.kv_demand_bytes = demand_bytes.get(model, 0)
    if admission is not None:
        message.admission_queued = admission.queued(model)
    message.serving.CopyFrom(serving_stats_proto(managed.request_stats.snapshot()))
