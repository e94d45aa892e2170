from prism_client.v1 import generate_pb2 as _generate_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EngineState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENGINE_STATE_UNSPECIFIED: _ClassVar[EngineState]
    ENGINE_STATE_LOADING: _ClassVar[EngineState]
    ENGINE_STATE_ACTIVE: _ClassVar[EngineState]
    ENGINE_STATE_INACTIVE: _ClassVar[EngineState]
    ENGINE_STATE_FAILED: _ClassVar[EngineState]
    ENGINE_STATE_DRAINING: _ClassVar[EngineState]
ENGINE_STATE_UNSPECIFIED: EngineState
ENGINE_STATE_LOADING: EngineState
ENGINE_STATE_ACTIVE: EngineState
ENGINE_STATE_INACTIVE: EngineState
ENGINE_STATE_FAILED: EngineState
ENGINE_STATE_DRAINING: EngineState

class Device(_message.Message):
    __slots__ = ("index", "kind", "name", "memory_bytes")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    index: int
    kind: str
    name: str
    memory_bytes: int
    def __init__(self, index: _Optional[int] = ..., kind: _Optional[str] = ..., name: _Optional[str] = ..., memory_bytes: _Optional[int] = ...) -> None: ...

class ModelSpec(_message.Message):
    __slots__ = ("name", "path", "tp_size", "load_format", "engine", "dtype", "seed", "slo", "priority", "shed_load", "max_context", "deterministic_inference", "no_prefix_caching")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    TP_SIZE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FORMAT_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SLO_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    SHED_LOAD_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    DETERMINISTIC_INFERENCE_FIELD_NUMBER: _ClassVar[int]
    NO_PREFIX_CACHING_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    tp_size: int
    load_format: str
    engine: str
    dtype: str
    seed: int
    slo: ModelSlo
    priority: int
    shed_load: bool
    max_context: int
    deterministic_inference: bool
    no_prefix_caching: bool
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., tp_size: _Optional[int] = ..., load_format: _Optional[str] = ..., engine: _Optional[str] = ..., dtype: _Optional[str] = ..., seed: _Optional[int] = ..., slo: _Optional[_Union[ModelSlo, _Mapping]] = ..., priority: _Optional[int] = ..., shed_load: _Optional[bool] = ..., max_context: _Optional[int] = ..., deterministic_inference: _Optional[bool] = ..., no_prefix_caching: _Optional[bool] = ...) -> None: ...

class ModelSlo(_message.Message):
    __slots__ = ("ttft_ms", "tpot_ms")
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TPOT_MS_FIELD_NUMBER: _ClassVar[int]
    ttft_ms: float
    tpot_ms: float
    def __init__(self, ttft_ms: _Optional[float] = ..., tpot_ms: _Optional[float] = ...) -> None: ...

class ServingStats(_message.Message):
    __slots__ = ("window_s", "arrival_rate", "finished_requests", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "slo_attainment", "shed_requests", "failed_requests", "busy_fraction", "mean_prompt_tokens", "mean_output_tokens", "recent_arrival_rate")
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_RATE_FIELD_NUMBER: _ClassVar[int]
    FINISHED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    TTFT_P50_MS_FIELD_NUMBER: _ClassVar[int]
    TTFT_P99_MS_FIELD_NUMBER: _ClassVar[int]
    TPOT_P50_MS_FIELD_NUMBER: _ClassVar[int]
    TPOT_P99_MS_FIELD_NUMBER: _ClassVar[int]
    SLO_ATTAINMENT_FIELD_NUMBER: _ClassVar[int]
    SHED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FAILED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    BUSY_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MEAN_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEAN_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RECENT_ARRIVAL_RATE_FIELD_NUMBER: _ClassVar[int]
    window_s: float
    arrival_rate: float
    finished_requests: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    slo_attainment: float
    shed_requests: int
    failed_requests: int
    busy_fraction: float
    mean_prompt_tokens: float
    mean_output_tokens: float
    recent_arrival_rate: float
    def __init__(self, window_s: _Optional[float] = ..., arrival_rate: _Optional[float] = ..., finished_requests: _Optional[int] = ..., ttft_p50_ms: _Optional[float] = ..., ttft_p99_ms: _Optional[float] = ..., tpot_p50_ms: _Optional[float] = ..., tpot_p99_ms: _Optional[float] = ..., slo_attainment: _Optional[float] = ..., shed_requests: _Optional[int] = ..., failed_requests: _Optional[int] = ..., busy_fraction: _Optional[float] = ..., mean_prompt_tokens: _Optional[float] = ..., mean_output_tokens: _Optional[float] = ..., recent_arrival_rate: _Optional[float] = ...) -> None: ...

class GpuMemory(_message.Message):
    __slots__ = ("gpu_id", "total_bytes", "weight_bytes", "reserve_bytes", "kv_budget_bytes", "kv_limit_bytes", "kv_mapped_bytes", "free_bytes", "engines")
    GPU_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESERVE_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_MAPPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENGINES_FIELD_NUMBER: _ClassVar[int]
    gpu_id: int
    total_bytes: int
    weight_bytes: int
    reserve_bytes: int
    kv_budget_bytes: int
    kv_limit_bytes: int
    kv_mapped_bytes: int
    free_bytes: int
    engines: _containers.RepeatedCompositeFieldContainer[EngineMemory]
    def __init__(self, gpu_id: _Optional[int] = ..., total_bytes: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., reserve_bytes: _Optional[int] = ..., kv_budget_bytes: _Optional[int] = ..., kv_limit_bytes: _Optional[int] = ..., kv_mapped_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., engines: _Optional[_Iterable[_Union[EngineMemory, _Mapping]]] = ...) -> None: ...

class EngineMemory(_message.Message):
    __slots__ = ("model", "active", "weight_bytes", "kv_limit_bytes", "kv_mapped_bytes", "kv_used_bytes", "kv_demand_bytes", "kv_held_bytes", "kv_cached_bytes")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_MAPPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_DEMAND_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_HELD_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHED_BYTES_FIELD_NUMBER: _ClassVar[int]
    model: str
    active: bool
    weight_bytes: int
    kv_limit_bytes: int
    kv_mapped_bytes: int
    kv_used_bytes: int
    kv_demand_bytes: int
    kv_held_bytes: int
    kv_cached_bytes: int
    def __init__(self, model: _Optional[str] = ..., active: _Optional[bool] = ..., weight_bytes: _Optional[int] = ..., kv_limit_bytes: _Optional[int] = ..., kv_mapped_bytes: _Optional[int] = ..., kv_used_bytes: _Optional[int] = ..., kv_demand_bytes: _Optional[int] = ..., kv_held_bytes: _Optional[int] = ..., kv_cached_bytes: _Optional[int] = ...) -> None: ...

class EngineStatus(_message.Message):
    __slots__ = ("model", "gpu_ids", "state", "error", "memory_limit_bytes", "kv_used_bytes", "weight_bytes", "running_requests", "queued_requests", "max_context", "kv_mapped_bytes", "kv_free_tokens", "memory_limit_revision", "memory_limit_status", "kv_demand_bytes", "admission_queued", "serving", "priority", "kv_pool", "attention", "cuda_graphs", "kv_cached_bytes", "prefix_cache_queried_tokens", "prefix_cache_hit_tokens")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GPU_IDS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    KV_MAPPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_FREE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_REVISION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_STATUS_FIELD_NUMBER: _ClassVar[int]
    KV_DEMAND_BYTES_FIELD_NUMBER: _ClassVar[int]
    ADMISSION_QUEUED_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    KV_POOL_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPHS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_QUERIED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    model: str
    gpu_ids: _containers.RepeatedScalarFieldContainer[int]
    state: EngineState
    error: str
    memory_limit_bytes: int
    kv_used_bytes: int
    weight_bytes: int
    running_requests: int
    queued_requests: int
    max_context: int
    kv_mapped_bytes: int
    kv_free_tokens: int
    memory_limit_revision: int
    memory_limit_status: str
    kv_demand_bytes: int
    admission_queued: int
    serving: ServingStats
    priority: int
    kv_pool: str
    attention: str
    cuda_graphs: bool
    kv_cached_bytes: int
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    def __init__(self, model: _Optional[str] = ..., gpu_ids: _Optional[_Iterable[int]] = ..., state: _Optional[_Union[EngineState, str]] = ..., error: _Optional[str] = ..., memory_limit_bytes: _Optional[int] = ..., kv_used_bytes: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., running_requests: _Optional[int] = ..., queued_requests: _Optional[int] = ..., max_context: _Optional[int] = ..., kv_mapped_bytes: _Optional[int] = ..., kv_free_tokens: _Optional[int] = ..., memory_limit_revision: _Optional[int] = ..., memory_limit_status: _Optional[str] = ..., kv_demand_bytes: _Optional[int] = ..., admission_queued: _Optional[int] = ..., serving: _Optional[_Union[ServingStats, _Mapping]] = ..., priority: _Optional[int] = ..., kv_pool: _Optional[str] = ..., attention: _Optional[str] = ..., cuda_graphs: _Optional[bool] = ..., kv_cached_bytes: _Optional[int] = ..., prefix_cache_queried_tokens: _Optional[int] = ..., prefix_cache_hit_tokens: _Optional[int] = ...) -> None: ...

class LoadModelRequest(_message.Message):
    __slots__ = ("spec", "gpu_ids", "activate", "memory_limit_bytes")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    GPU_IDS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    spec: ModelSpec
    gpu_ids: _containers.RepeatedScalarFieldContainer[int]
    activate: bool
    memory_limit_bytes: int
    def __init__(self, spec: _Optional[_Union[ModelSpec, _Mapping]] = ..., gpu_ids: _Optional[_Iterable[int]] = ..., activate: _Optional[bool] = ..., memory_limit_bytes: _Optional[int] = ...) -> None: ...

class ModelRequest(_message.Message):
    __slots__ = ("model", "force", "busy_window_s")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    BUSY_WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    model: str
    force: bool
    busy_window_s: float
    def __init__(self, model: _Optional[str] = ..., force: _Optional[bool] = ..., busy_window_s: _Optional[float] = ...) -> None: ...

class SetMemoryLimitRequest(_message.Message):
    __slots__ = ("model", "memory_limit_bytes", "revision")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    model: str
    memory_limit_bytes: int
    revision: int
    def __init__(self, model: _Optional[str] = ..., memory_limit_bytes: _Optional[int] = ..., revision: _Optional[int] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AgentStatus(_message.Message):
    __slots__ = ("agent_id", "devices", "engines", "gpus")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    ENGINES_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    engines: _containers.RepeatedCompositeFieldContainer[EngineStatus]
    gpus: _containers.RepeatedCompositeFieldContainer[GpuMemory]
    def __init__(self, agent_id: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., engines: _Optional[_Iterable[_Union[EngineStatus, _Mapping]]] = ..., gpus: _Optional[_Iterable[_Union[GpuMemory, _Mapping]]] = ...) -> None: ...
