from prism_client.v1 import generate_pb2 as _generate_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("pid", "device", "warmup_s", "import_s", "model_loaded", "model")
    PID_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    WARMUP_S_FIELD_NUMBER: _ClassVar[int]
    IMPORT_S_FIELD_NUMBER: _ClassVar[int]
    MODEL_LOADED_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    pid: int
    device: str
    warmup_s: float
    import_s: float
    model_loaded: bool
    model: str
    def __init__(self, pid: _Optional[int] = ..., device: _Optional[str] = ..., warmup_s: _Optional[float] = ..., import_s: _Optional[float] = ..., model_loaded: _Optional[bool] = ..., model: _Optional[str] = ...) -> None: ...

class EngineLoadSpec(_message.Message):
    __slots__ = ("path", "name", "load_format", "dtype", "seed", "memory_limit_bytes", "kv_capacity_bytes", "shared_weights_path", "max_context", "tensor_parallel", "step_board_path", "step_board_slot", "no_prefix_caching")
    PATH_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    LOAD_FORMAT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHARED_WEIGHTS_PATH_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TENSOR_PARALLEL_FIELD_NUMBER: _ClassVar[int]
    STEP_BOARD_PATH_FIELD_NUMBER: _ClassVar[int]
    STEP_BOARD_SLOT_FIELD_NUMBER: _ClassVar[int]
    NO_PREFIX_CACHING_FIELD_NUMBER: _ClassVar[int]
    path: str
    name: str
    load_format: str
    dtype: str
    seed: int
    memory_limit_bytes: int
    kv_capacity_bytes: int
    shared_weights_path: str
    max_context: int
    tensor_parallel: TensorParallelSpec
    step_board_path: str
    step_board_slot: int
    no_prefix_caching: bool
    def __init__(self, path: _Optional[str] = ..., name: _Optional[str] = ..., load_format: _Optional[str] = ..., dtype: _Optional[str] = ..., seed: _Optional[int] = ..., memory_limit_bytes: _Optional[int] = ..., kv_capacity_bytes: _Optional[int] = ..., shared_weights_path: _Optional[str] = ..., max_context: _Optional[int] = ..., tensor_parallel: _Optional[_Union[TensorParallelSpec, _Mapping]] = ..., step_board_path: _Optional[str] = ..., step_board_slot: _Optional[int] = ..., no_prefix_caching: _Optional[bool] = ...) -> None: ...

class TensorParallelSpec(_message.Message):
    __slots__ = ("rank", "size", "rendezvous")
    RANK_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    RENDEZVOUS_FIELD_NUMBER: _ClassVar[int]
    rank: int
    size: int
    rendezvous: str
    def __init__(self, rank: _Optional[int] = ..., size: _Optional[int] = ..., rendezvous: _Optional[str] = ...) -> None: ...

class LoadReply(_message.Message):
    __slots__ = ("weight_bytes", "max_context", "load_s", "device", "kv_bytes_per_token", "kv_bundle_bytes", "weights_attached", "weights_shared", "kv_pool", "attention", "cuda_graphs")
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    LOAD_S_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    KV_BUNDLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_ATTACHED_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_SHARED_FIELD_NUMBER: _ClassVar[int]
    KV_POOL_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPHS_FIELD_NUMBER: _ClassVar[int]
    weight_bytes: int
    max_context: int
    load_s: float
    device: str
    kv_bytes_per_token: int
    kv_bundle_bytes: int
    weights_attached: bool
    weights_shared: bool
    kv_pool: str
    attention: str
    cuda_graphs: bool
    def __init__(self, weight_bytes: _Optional[int] = ..., max_context: _Optional[int] = ..., load_s: _Optional[float] = ..., device: _Optional[str] = ..., kv_bytes_per_token: _Optional[int] = ..., kv_bundle_bytes: _Optional[int] = ..., weights_attached: _Optional[bool] = ..., weights_shared: _Optional[bool] = ..., kv_pool: _Optional[str] = ..., attention: _Optional[str] = ..., cuda_graphs: _Optional[bool] = ...) -> None: ...

class WorkerSetMemoryLimitRequest(_message.Message):
    __slots__ = ("memory_limit_bytes", "revision")
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    memory_limit_bytes: int
    revision: int
    def __init__(self, memory_limit_bytes: _Optional[int] = ..., revision: _Optional[int] = ...) -> None: ...

class MemoryLimitReply(_message.Message):
    __slots__ = ("status", "limit_bytes", "effective_limit_bytes", "mapped_bytes", "revision")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAPPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    status: str
    limit_bytes: int
    effective_limit_bytes: int
    mapped_bytes: int
    revision: int
    def __init__(self, status: _Optional[str] = ..., limit_bytes: _Optional[int] = ..., effective_limit_bytes: _Optional[int] = ..., mapped_bytes: _Optional[int] = ..., revision: _Optional[int] = ...) -> None: ...

class ActivateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ActivateReply(_message.Message):
    __slots__ = ("activated", "nbytes", "allocate_s", "copy_s", "ready_s")
    ACTIVATED_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    ALLOCATE_S_FIELD_NUMBER: _ClassVar[int]
    COPY_S_FIELD_NUMBER: _ClassVar[int]
    READY_S_FIELD_NUMBER: _ClassVar[int]
    activated: bool
    nbytes: int
    allocate_s: float
    copy_s: float
    ready_s: float
    def __init__(self, activated: _Optional[bool] = ..., nbytes: _Optional[int] = ..., allocate_s: _Optional[float] = ..., copy_s: _Optional[float] = ..., ready_s: _Optional[float] = ...) -> None: ...

class DeactivateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeactivateReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EngineStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EngineStatsReply(_message.Message):
    __slots__ = ("running_requests", "queued_requests", "kv_used_bytes", "memory_limit_bytes", "weight_bytes", "kv_mapped_bytes", "kv_free_tokens", "memory_limit_revision", "memory_limit_status", "active", "kv_demand_tokens", "device_used_bytes", "kv_held_bytes", "step_count", "step_xtx", "step_xty", "kv_cached_bytes", "prefix_cache_queried_tokens", "prefix_cache_hit_tokens")
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    KV_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_BYTES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_MAPPED_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_FREE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_REVISION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LIMIT_STATUS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    KV_DEMAND_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_HELD_BYTES_FIELD_NUMBER: _ClassVar[int]
    STEP_COUNT_FIELD_NUMBER: _ClassVar[int]
    STEP_XTX_FIELD_NUMBER: _ClassVar[int]
    STEP_XTY_FIELD_NUMBER: _ClassVar[int]
    KV_CACHED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_QUERIED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    running_requests: int
    queued_requests: int
    kv_used_bytes: int
    memory_limit_bytes: int
    weight_bytes: int
    kv_mapped_bytes: int
    kv_free_tokens: int
    memory_limit_revision: int
    memory_limit_status: str
    active: bool
    kv_demand_tokens: int
    device_used_bytes: int
    kv_held_bytes: int
    step_count: float
    step_xtx: _containers.RepeatedScalarFieldContainer[float]
    step_xty: _containers.RepeatedScalarFieldContainer[float]
    kv_cached_bytes: int
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    def __init__(self, running_requests: _Optional[int] = ..., queued_requests: _Optional[int] = ..., kv_used_bytes: _Optional[int] = ..., memory_limit_bytes: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., kv_mapped_bytes: _Optional[int] = ..., kv_free_tokens: _Optional[int] = ..., memory_limit_revision: _Optional[int] = ..., memory_limit_status: _Optional[str] = ..., active: _Optional[bool] = ..., kv_demand_tokens: _Optional[int] = ..., device_used_bytes: _Optional[int] = ..., kv_held_bytes: _Optional[int] = ..., step_count: _Optional[float] = ..., step_xtx: _Optional[_Iterable[float]] = ..., step_xty: _Optional[_Iterable[float]] = ..., kv_cached_bytes: _Optional[int] = ..., prefix_cache_queried_tokens: _Optional[int] = ..., prefix_cache_hit_tokens: _Optional[int] = ...) -> None: ...

class ShutdownRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ShutdownReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
