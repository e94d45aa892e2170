"""A simulated engine: the real continuous-batching scheduler
(services/gpu_agent/engine/batch_scheduler.py, with its Sequence objects) over a KV
pool that only counts tokens and pages, and step times from the profile
instead of a forward pass."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prism.simulator.models import SimModel
from prism.simulator.profile import LatencyProfile
from services.common.step_costs import DEFAULT_STEP_TOKENS
from services.gpu_agent.engine.batch_scheduler import BatchScheduler, ScheduleResult
from services.gpu_agent.engine.graph_shapes import graph_shape
from services.gpu_agent.engine.kv_pool import KVPool, MemoryLimitState
from services.gpu_agent.engine.request import DEMAND_GROWTH_TOKENS
from services.gpu_agent.engine.sampling import SamplingParams
from services.gpu_agent.engine.sequence import Sequence
from services.gpu_agent.request_stats import ModelRequestStats
from services.gpu_agent.slo import ModelSlo

if TYPE_CHECKING:  # the cluster's module imports this one
    from prism.simulator.cluster import Ticket


class CountingPool(KVPool):
    """kvcached's interface with nothing behind it: slots are counted on pages placed as kvcached places
    them, and the limit caps mapped pages like the real pools do (a limit below what is mapped defers:
    no new page until frees bring it under).

    Placement is kvcached's (KVCacheManager._pick_avail_page): an allocation goes to the mapped page
    with the fewest free slots that still holds it whole, else to the one with the most (and on to
    the next), and a new page is mapped only when no mapped page has a free slot; a page is unmapped
    when its last slot is freed. Decode slots so spread over the pages of every running sequence, and
    a page stays mapped until its last sequence ends: the pages held exceed the slots used (1.2x at
    the median, 1.4-1.7x at p90 for twenty 8B sequences of median 512 + 128 tokens). A slot here is
    the id of its page."""

    def __init__(self, model: SimModel, capacity_tokens: int):
        self.capacity_tokens = capacity_tokens
        self.tokens_per_page = model.tokens_per_page
        self._bundle = model.bundle_bytes
        self._used = 0
        self._free_in_page: dict[int, int] = {}  # mapped page -> its free slots
        self._unused_ids: list[int] = []  # page ids to reuse
        self._next_id = 0
        self._limit = 0
        self._revision = 0

    @property
    def bundle_bytes(self) -> int:
        return self._bundle

    def _pages(self, tokens: int) -> int:
        return -(-tokens // self.tokens_per_page)

    def _effective(self) -> int:
        return min(self._limit // self._bundle, self._pages(self.capacity_tokens)) * self._bundle

    def _mappable_pages(self) -> int:
        return max(0, self._effective() // self._bundle - len(self._free_in_page))

    def alloc(self, n: int) -> list[int] | None:
        if n <= 0:
            return []
        if self._used + n > self.capacity_tokens or n > self.free_tokens:
            return None
        slots: list[int] = []
        while n > 0:
            page = self._pick_page(n)
            take = min(n, self._free_in_page[page])
            self._free_in_page[page] -= take
            slots.extend([page] * take)
            n -= take
        self._used += len(slots)
        return slots

    def _pick_page(self, n: int) -> int:
        """The page the next `n` slots go to: the fullest that holds them all, else the emptiest mapped
        page with room, else a newly mapped one."""
        fits = [(free, page) for page, free in self._free_in_page.items() if free >= n]
        if fits:
            return min(fits)[1]
        partial = [(free, page) for page, free in self._free_in_page.items() if free > 0]
        if partial:
            return max(partial)[1]
        page = self._unused_ids.pop() if self._unused_ids else self._new_id()
        self._free_in_page[page] = self.tokens_per_page
        return page

    def _new_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1

    def free(self, slots: list[int]) -> None:
        for page in slots:
            free = self._free_in_page[page] + 1
            if free == self.tokens_per_page:
                del self._free_in_page[page]
                self._unused_ids.append(page)
            else:
                self._free_in_page[page] = free
        self._used -= len(slots)

    def set_memory_limit(self, limit_bytes: int, revision: int = 0) -> MemoryLimitState:
        self._limit = max(0, limit_bytes)
        self._revision += 1
        return self.limit_state()

    def limit_state(self) -> MemoryLimitState:
        mapped = len(self._free_in_page) * self._bundle
        effective = self._effective()
        return MemoryLimitState(
            "deferred" if mapped > effective else "applied", self._limit, effective, mapped, self._revision
        )

    @property
    def limit_bytes(self) -> int:
        return self._limit

    @property
    def used_tokens(self) -> int:
        return self._used

    @property
    def held_bytes(self) -> int:
        return len(self._free_in_page) * self._bundle

    @property
    def free_tokens(self) -> int:
        return sum(self._free_in_page.values()) + self._mappable_pages() * self.tokens_per_page


@dataclass(eq=False)
class SimRequest:
    index: int
    model: str
    t: float  # arrival at the gateway (the trace's time)
    prompt_tokens: int
    output_tokens: int
    first_token_at: float | None = None
    finished_at: float | None = None
    tokens: int = 0  # output tokens produced
    error: str | None = None
    seq: Sequence | None = None
    ticket: Ticket | None = None  # the admission ticket while it holds a reservation
    engine: SimEngine | None = None  # the engine it was delivered to (its agent's request stats count it)

    @property
    def done(self) -> bool:
        return self.finished_at is not None or self.error is not None


def _ignore(_item) -> bool:
    return True


@dataclass
class Step:
    result: ScheduleResult
    duration_s: float
    too_big: list[SimRequest] = field(default_factory=list)
    captured: bool = False  # it captured a decode graph (its duration includes the capture)


class SimEngine:
    """One model's engine on one GPU of an agent (or several: `gpus`, a model
    split by tensor parallelism; `gpu` is the first, where its requests are
    admitted and its KV limit is kept). States as the agent reports
    them: loading, inactive, active; plus activating (reported inactive, as
    the real one is until its weights are on the GPU); `draining` on top of
    active or inactive is reported as draining."""

    def __init__(
        self,
        model: SimModel,
        agent_id: str,
        gpus: tuple[int, ...],
        capacity_tokens: int,
        created_at: float,
        cap_bytes: int = 0,
        clock: Callable[[], float] | None = None,
        step_tokens: int = DEFAULT_STEP_TOKENS,
        stats_started_at: float | None = None,
        step_factor: float = 1.0,
    ):
        """step_factor: its steps take this many times the profile's time for its shard's size (a split
        model's; 1 for one on a single GPU)."""
        self.model = model
        self.name = model.name  # read tens of millions of times in an overloaded run: an attribute, not a property
        # The agent's request stats for this engine (arrival rate, busy fraction, tokens per request), on
        # simulated time.
        self.stats = ModelRequestStats(
            ModelSlo(ttft_ms=model.ttft_s * 1000, tpot_ms=model.tpot_s * 1000),
            clock=clock or (lambda: created_at),
            started_at=stats_started_at,
        )
        self.agent_id = agent_id
        self.gpus = gpus
        self.gpu = gpus[0]
        self.split = len(gpus) > 1
        self.step_factor = step_factor
        self.cap_bytes = cap_bytes
        self.pool = CountingPool(model, capacity_tokens)
        self.batcher = BatchScheduler(self.pool, step_tokens)
        self.state = "loading"
        self.created_at = created_at
        self.last_arrival = float("-inf")
        self.pending: list[SimRequest] = []  # arrived while it was switched off: wait for its activation
        self.requests: dict[Sequence, SimRequest] = {}
        self.stepping = False
        self.draining = False  # being unloaded: serves what it has, then goes (SimCluster.unload)
        self.drain_token = 0  # which drain a timeout event belongs to (a cancelled drain's timeout is void)
        # The decode graphs' shapes captured since it was last switched on (the engine drops them when
        # switched off; drop_graphs).
        self.graphs: set[tuple[int, int]] = set()

    @property
    def limit_bytes(self) -> int:
        return self.pool.limit_bytes

    def set_limit(self, nbytes: int) -> None:
        self.pool.set_memory_limit(nbytes)

    @property
    def used_bytes(self) -> int:
        return self.pool.used_tokens * self.model.kv_bytes_per_token

    @property
    def holding_bytes(self) -> int:
        """The KV its requests hold physically: the pages their slots are on (EngineStats.kv_holding_bytes)."""
        return max(self.used_bytes, self.pool.held_bytes)

    def demand_tokens(self) -> int:
        return self.batcher.demand_tokens(DEMAND_GROWTH_TOKENS)

    @property
    def running(self) -> int:
        return len(self.batcher.running)

    @property
    def queued(self) -> int:
        return len(self.batcher.waiting)

    def submit(self, request: SimRequest) -> bool:
        """Into the engine's queue; False when its prompt cannot fit the limit
        now (the real engine's CapacityError at submission)."""
        if not self.batcher.fits_alone(request.prompt_tokens):
            return False
        # No detokenizer: the batch scheduler reads only a sequence's lengths, and nothing here samples or
        # detokenizes. Sequence types it as always given (services/gpu_agent/engine/sequence.py).
        seq = Sequence(
            request_id=str(request.index),
            prompt_ids=[0] * request.prompt_tokens,
            max_tokens=request.output_tokens,
            stop=[],
            ignore_eos=True,
            generator=None,
            deliver=_ignore,
            sampling=SamplingParams(),
            detokenizer=None,  # type: ignore[arg-type]
        )
        request.seq = seq
        self.requests[seq] = request
        self.batcher.add(seq)
        return True

    def start_step(self, profile: LatencyProfile) -> Step | None:
        """Plans the next step with the real scheduler and times it; None
        when nothing can run (waiting sequences that do not fit the limit)."""
        result = self.batcher.schedule()
        too_big = [self.requests.pop(seq) for seq in result.too_big]
        if not result.batch:
            return Step(result, 0.0, too_big) if too_big else None
        decode = result.num_decode
        context = sum(item.start for item in result.batch[:decode]) * self.model.kv_bytes_per_token
        prefill = sum(item.count for item in result.batch[decode:])
        duration = self.step_factor * profile.step_s(
            self.model.shard_weight_bytes, decode, context, prefill, len(result.batch) - decode
        )
        captured = self._captures_graph(profile, result)
        self.stepping = True
        return Step(result, duration + (profile.graph_capture_s if captured else 0.0), too_big, captured)

    def _captures_graph(self, profile: LatencyProfile, result: ScheduleResult) -> bool:
        """Whether this step captures a decode graph first: a pure decode step of a shape not captured since
        the engine was switched on, where the profile times captures (the built-in engine on CUDA)."""
        if not profile.graph_capture_s or result.num_decode != len(result.batch) or self.split:
            return False
        shape = graph_shape(result.num_decode, max(item.start + 1 for item in result.batch))
        if shape is None or shape in self.graphs:
            return False
        self.graphs.add(shape)
        return True

    def drop_graphs(self) -> None:
        """Switched off: its graphs held its weights' and KV's addresses, so the next activation captures anew."""
        self.graphs.clear()

    def end_step(self, step: Step) -> tuple[list[SimRequest], list[SimRequest]]:
        """Applies a finished step: (requests that got their first token,
        requests that finished)."""
        self.stepping = False
        first, finished = [], []
        for item in step.result.batch:
            seq = item.seq
            request = self.requests.get(seq)
            if request is None:
                continue  # failed or removed while the step ran
            seq.num_cached = item.start + item.count
            if not item.samples:
                continue
            seq.token_ids.append(0)
            request.tokens = seq.num_output
            if seq.num_output == 1 and request.first_token_at is None:
                first.append(request)
            if seq.num_output >= seq.max_tokens or len(seq.token_ids) >= self.model.max_context:
                self.batcher.remove(seq)
                del self.requests[seq]
                finished.append(request)
        return first, finished

    def drop_all(self) -> list[SimRequest]:
        """Every request it holds (unloaded): out of the scheduler."""
        out = list(self.requests.values())
        for seq in list(self.requests):
            self.batcher.remove(seq)
        self.requests.clear()
        out.extend(self.pending)
        self.pending.clear()
        return out

    def busy(self, now: float, window_s: float) -> bool:
        """What makes the agent refuse a (non-forced) deactivation."""
        return bool(self.requests or self.pending) or now - self.last_arrival < window_s
