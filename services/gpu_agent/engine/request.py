"""What callers hand the engine and what they get back."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.step_costs import StepTimeSums

# The growth counted in each request's KV demand (EngineStats.kv_demand_tokens,
# and the agent's admission): enough decode steps that the memory coordinator,
# re-planning every 100 ms, raises a limit before the requests reach it.
DEMAND_GROWTH_TOKENS = 32


@dataclass
class GenerationRequest:
    request_id: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None  # [{"role": ..., "content": ...}], rendered with the chat template
    add_generation_prompt: bool = True
    max_tokens: int | None = None  # None: the rest of the context
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass
class GenerationOutput:
    """One streamed piece."""

    text: str  # text decoded since the previous piece (stop strings removed)
    token_ids: list[int]  # token ids since the previous piece
    finish_reason: str | None  # None while running; "stop" (EOS or stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (OpenAI's cached_tokens)


@dataclass(frozen=True)
class ServingPath:
    """How an engine serves: its KV pool, its attention kernels and whether decode steps replay CUDA graphs
    (the agent's GetStatus, /metrics and prism status show it: a slow path is never silent)."""

    kv_pool: str  # "kvcached", "pages" (the page pool), "sglang"
    attention: str  # "triton", "torch", "sglang"
    cuda_graphs: bool

    def slow_on(self, device: str) -> bool:
        """The built-in engine on CUDA without decode graphs (on an H100 the 1B's batch-1 step on the page
        pool took 9.96 ms against 1.70 ms with kvcached and graphs, the 8B's 14.6 against 6.8)."""
        return device.startswith("cuda") and self.kv_pool == "pages" and not self.cuda_graphs


@dataclass
class EngineStats:
    running_requests: int
    queued_requests: int
    kv_used_bytes: int
    memory_limit_bytes: int  # as last set
    weight_bytes: int
    kv_mapped_bytes: int = 0  # physical KV memory the pool holds (whole pages)
    kv_free_tokens: int = 0  # token slots that can still be allocated under the limit
    memory_limit_revision: int = 0
    memory_limit_status: str = "applied"  # or "deferred": mapped is above the limit until requests end
    kv_demand_tokens: int = 0  # token slots its requests hold, and will need over the next few steps
    device_used_bytes: int = 0  # the whole device's memory in use, every process's (a worker's CUDA device); 0: unknown
    # The pages holding its requests' KV, whole (KVPool.held_bytes): at least kv_used_bytes; 0: unknown
    kv_held_bytes: int = 0
    # Its steps' least-squares sums (services/common/step_costs.py): the scheduler fits step costs from them.
    step_times: StepTimeSums = StepTimeSums()
    # The prefix cache: the KV only it keeps (given back first when memory is needed; not in kv_used_bytes
    # nor kv_held_bytes), and the prompt tokens admitted and found there.
    kv_cached_bytes: int = 0
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0

    @property
    def kv_holding_bytes(self) -> int:
        """The KV memory its requests hold physically: the pages their slots are on where known."""
        return max(self.kv_used_bytes, self.kv_held_bytes)
