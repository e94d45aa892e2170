"""What one device's memory is split into, as reported (AgentStatus.gpus,
LoadReport.gpus, /metrics, `prism top`). The memory coordinator builds it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineMemory:
    model: str
    active: bool
    weight_bytes: int
    kv_limit_bytes: int
    kv_mapped_bytes: int
    kv_used_bytes: int
    kv_demand_bytes: int  # what its running and queued requests need soon
    kv_held_bytes: int = 0  # the pages its requests' KV is on, whole (EngineStats.kv_holding_bytes)
    kv_cached_bytes: int = 0  # KV only its prefix cache keeps (the coordinator may take it)


@dataclass(frozen=True)
class DeviceMemorySplit:
    gpu_id: int
    total_bytes: int
    weight_bytes: int  # weights of the active engines
    reserve_bytes: int
    kv_budget_bytes: int  # total - weights - reserve
    kv_limit_bytes: int  # the active engines' limits, summed
    kv_mapped_bytes: int
    free_bytes: int  # kv_budget - kv_limit
    engines: tuple[EngineMemory, ...]
