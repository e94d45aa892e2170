from prism_client.v1 import agent_pb2 as _agent_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterAgentRequest(_message.Message):
    __slots__ = ("agent_id", "address", "devices")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    address: str
    devices: _containers.RepeatedCompositeFieldContainer[_agent_pb2.Device]
    def __init__(self, agent_id: _Optional[str] = ..., address: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[_agent_pb2.Device, _Mapping]]] = ...) -> None: ...

class RegisterAgentResponse(_message.Message):
    __slots__ = ("report_interval_ms",)
    REPORT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    report_interval_ms: int
    def __init__(self, report_interval_ms: _Optional[int] = ...) -> None: ...

class ModelLoad(_message.Message):
    __slots__ = ("model", "state", "arrival_rate", "queued_requests", "running_requests", "kv_used_bytes", "memory_limit_bytes", "kv_mapped_bytes", "kv_free_tokens", "kv_demand_bytes", "admission_queued", "serving", "step_count", "step_xtx", "step_xty", "kv_cached_bytes", "prefix_cache_queried_tokens", "prefix_cache_hit_tokens")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ARRIVAL_RATE_FIELD_NUMBER: _ClassVar[int]
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    KV_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_MAPPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_FREE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_DEMAND_BYTES_FIELD_NUMBER: _ClassVar[int]
    ADMISSION_QUEUED_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    STEP_COUNT_FIELD_NUMBER: _ClassVar[int]
    STEP_XTX_FIELD_NUMBER: _ClassVar[int]
    STEP_XTY_FIELD_NUMBER: _ClassVar[int]
    KV_CACHED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_QUERIED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    model: str
    state: _agent_pb2.EngineState
    arrival_rate: float
    queued_requests: int
    running_requests: int
    kv_used_bytes: int
    memory_limit_bytes: int
    kv_mapped_bytes: int
    kv_free_tokens: int
    kv_demand_bytes: int
    admission_queued: int
    serving: _agent_pb2.ServingStats
    step_count: float
    step_xtx: _containers.RepeatedScalarFieldContainer[float]
    step_xty: _containers.RepeatedScalarFieldContainer[float]
    kv_cached_bytes: int
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    def __init__(self, model: _Optional[str] = ..., state: _Optional[_Union[_agent_pb2.EngineState, str]] = ..., arrival_rate: _Optional[float] = ..., queued_requests: _Optional[int] = ..., running_requests: _Optional[int] = ..., kv_used_bytes: _Optional[int] = ..., memory_limit_bytes: _Optional[int] = ..., kv_mapped_bytes: _Optional[int] = ..., kv_free_tokens: _Optional[int] = ..., kv_demand_bytes: _Optional[int] = ..., admission_queued: _Optional[int] = ..., serving: _Optional[_Union[_agent_pb2.ServingStats, _Mapping]] = ..., step_count: _Optional[float] = ..., step_xtx: _Optional[_Iterable[float]] = ..., step_xty: _Optional[_Iterable[float]] = ..., kv_cached_bytes: _Optional[int] = ..., prefix_cache_queried_tokens: _Optional[int] = ..., prefix_cache_hit_tokens: _Optional[int] = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("agent_id", "sequence", "models", "gpus")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    sequence: int
    models: _containers.RepeatedCompositeFieldContainer[ModelLoad]
    gpus: _containers.RepeatedCompositeFieldContainer[_agent_pb2.GpuMemory]
    def __init__(self, agent_id: _Optional[str] = ..., sequence: _Optional[int] = ..., models: _Optional[_Iterable[_Union[ModelLoad, _Mapping]]] = ..., gpus: _Optional[_Iterable[_Union[_agent_pb2.GpuMemory, _Mapping]]] = ...) -> None: ...

class LoadReportAck(_message.Message):
    __slots__ = ("sequence",)
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    def __init__(self, sequence: _Optional[int] = ...) -> None: ...
