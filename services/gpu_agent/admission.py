"""Admission control of one device: which request goes into its engine next.

Every request gets a deadline, its arrival plus its model's TTFT SLO. Requests
of all the models on the device wait in one queue ordered by deadline
(earliest first; with one TTFT per model this is the order of least slack),
except that a request waiting longer than `starvation_s` goes first whatever
its deadline, so a model with a loose SLO is never starved by tight ones.

A request is admitted when its KV can be reserved: its prompt and a few steps
of output (DEMAND_GROWTH_TOKENS) fit under its engine's limit beside what the
engine's requests already need and what admission has reserved there and the
engine does not count yet; failing that, when the memory coordinator can
grant the engine that much more at once from the device's unassigned budget.
A request that fits neither waits (the coordinator's next plan counts it as
demand, so memory moves to it by priority); the requests behind it for other
models go on. A request whose deadline has passed while it waited can no
longer meet its SLO: for a model whose config asks to shed load it is refused
(ShedError: gRPC RESOURCE_EXHAUSTED, HTTP 429 with Retry-After); otherwise it
stays and is served late. Past admission the same holds in the engine
(started_by): a shedding model's request with no first token by its TTFT SLO
is refused and dropped there. Nothing leaves the queue silently: each waiter is
admitted, refused with a reason, or cancelled by its own client."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from services.gpu_agent.engine.errors import CapacityError
from services.gpu_agent.engine.request import DEMAND_GROWTH_TOKENS
from services.gpu_agent.engine_manager import DrainingError, EngineNotReadyError, ManagedEngine
from services.gpu_agent.memory_coordinator import MemoryCoordinator

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_STARVATION_S = 5.0
RECHECK_S = 0.02  # while requests wait: how often to look again (engine numbers change between pokes)


# ---- the pure parts (the agent's queue below and the simulator call them) ------------


def admission_key(arrival: float, deadline: float, now: float, starvation_s: float) -> tuple[int, float]:
    """A waiting request's place in the queue (smallest first): one that has
    waited `starvation_s` or longer goes first, oldest first; the others by
    their TTFT deadline."""
    if now - arrival >= starvation_s:
        return (0, arrival)
    return (1, deadline)


def free_tokens(
    limit_bytes: int, kv_bytes_per_token: int, engine_demand_tokens: int, engine_used_bytes: int, reserved_tokens: int
) -> int:
    """Token slots under an engine's limit that neither its requests (what
    they hold or will need soon, whichever is more) nor admission's
    reservations claim; negative when they claim more than the limit."""
    per_token = max(1, kv_bytes_per_token)
    engine_claims = max(engine_demand_tokens, engine_used_bytes // per_token)
    return limit_bytes // per_token - engine_claims - reserved_tokens


def shortfall_bytes(tokens: int, free: int, kv_bytes_per_token: int) -> int:
    """What a request of `tokens` lacks beyond `free` token slots, in bytes."""
    return (tokens - max(0, free)) * kv_bytes_per_token


class ShedError(Exception):
    """The request cannot meet its SLO and its model sheds load."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


async def started_by(
    outputs: AsyncIterator[T], deadline: float, model: str, ttft_ms: float, arrival: float
) -> AsyncIterator[T]:
    """A shedding model's request in its engine: the engine's outputs, or ShedError where the first has not
    come by `deadline` (arrival plus the TTFT SLO). The request waited for compute (its engine's queue, a
    prefill behind others') past its SLO: refused rather than served late, its sequence dropped and its KV
    freed (the engine's stream is cancelled, which aborts it), so the compute goes to requests that can still
    meet theirs. Simulated on one H100's showdown (8 seeds, bench/results/one_gpu-sim-h100-8seeds-shed-load.*)
    the requests within SLO at 40 and 50 req/s went from 92.1 and 85.1% to 94.3 and 90.8%, nothing changed
    below 26, and a lone 8B at 60 req/s went from 38.9 to 55.8%."""
    try:
        try:
            first = await asyncio.wait_for(anext(outputs), max(0.0, deadline - time.monotonic()))
        except StopAsyncIteration:
            return
        except TimeoutError:
            waited = time.monotonic() - arrival
            raise ShedError(
                f"model {model!r} is overloaded: the request had no first token {waited:.2f}s after it "
                f"arrived, past its TTFT SLO of {ttft_ms:.0f} ms",
                retry_after_s=max(1, math.ceil(waited)),
            ) from None
        yield first
        async for out in outputs:
            yield out
    finally:  # stopped early (the client left): the engine's stream ends now, not when collected
        close = getattr(outputs, "aclose", None)
        if close is not None:
            await close()


@dataclass(eq=False)
class Ticket:
    """One request's place: waiting, then admitted with `tokens` reserved until
    the engine counts them itself (its first output) or the request ends."""

    managed: ManagedEngine
    tokens: int
    arrival: float
    deadline: float
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    reserved: bool = False
    queue: AdmissionQueue | None = None

    @property
    def model(self) -> str:
        return self.managed.spec.name

    def started(self) -> None:
        """The engine holds the request's KV now: drop the reservation."""
        if self.reserved and self.queue is not None:
            self.queue._unreserve(self)

    def release(self) -> None:
        """The request ended (or was never admitted): gives back what it held here."""
        if self.queue is not None:
            self.queue._release(self)


class AdmissionQueue:
    def __init__(
        self,
        coordinator: MemoryCoordinator,
        starvation_s: float = DEFAULT_STARVATION_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.coordinator = coordinator
        self.starvation_s = starvation_s
        self.clock = clock
        self.waiting: list[Ticket] = []
        self._reserved_tokens: dict[str, int] = {}
        self._wake = asyncio.Event()
        coordinator.pending_demand_bytes = self.pending_demand_bytes
        coordinator.on_limits_changed = self.poke
        coordinator.send_back = self.send_back
        self.admitted = self.shed = 0

    # ---- numbers for the coordinator and the reports -----------------------------

    def queued(self, model: str) -> int:
        return sum(1 for t in self.waiting if t.model == model)

    def pending_demand_bytes(self, model: str) -> int:
        """KV that requests of `model` need and its engine does not count yet."""
        tokens = self._reserved_tokens.get(model, 0) + sum(t.tokens for t in self.waiting if t.model == model)
        managed = next((t.managed for t in self.waiting if t.model == model), None)
        if managed is None:
            managed = self.coordinator.manager.engines.get(model)
        if managed is None or managed.engine is None:
            return 0
        return tokens * managed.engine.kv_bytes_per_token

    # ---- admission -----------------------------------------------------------------

    async def admit(self, managed: ManagedEngine, prompt_tokens: int) -> Ticket:
        """Waits until the request may go into its engine; the caller must
        release() the ticket when the request ends. Raises ShedError, or
        EngineNotReadyError if the engine stops serving meanwhile, and
        CapacityError at once for a request whose KV no limit on this device
        could ever hold (it would wait forever)."""
        now = self.clock()
        ticket = Ticket(
            managed=managed,
            tokens=prompt_tokens + DEMAND_GROWTH_TOKENS,
            arrival=now,
            deadline=now + managed.slo.ttft_s,
            queue=self,
        )
        engine = managed.started_engine  # the agent admits requests for ready engines only
        if prompt_tokens >= engine.max_context:
            ticket.tokens = 0  # over the model's context: the engine refuses it at once, nothing to wait for
            return ticket
        most = self.coordinator.most_kv_bytes(managed)
        need = (prompt_tokens + 1) * engine.kv_bytes_per_token
        if need > most:
            raise CapacityError(
                f"the prompt's {prompt_tokens} tokens need {need} bytes of KV cache, more than "
                f"model {managed.spec.name!r} can ever be given on this device ({most} bytes)"
            )
        if not self.waiting and self._fits(ticket):  # nobody ahead and room now: no queueing at all
            self._reserve(ticket)
            return ticket
        self.waiting.append(ticket)
        self.coordinator.poke()  # demand just grew
        self.poke()
        try:
            await ticket.future
        except BaseException:
            ticket.release()  # cancelled (client gone) or refused: out of the queue, nothing reserved
            raise
        return ticket

    def poke(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), RECHECK_S if self.waiting else None)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.pump()
            except Exception:
                log.exception("admission of device %d failed a pass", self.coordinator.device.index)

    def _key(self, ticket: Ticket, now: float) -> tuple[int, float]:
        return admission_key(ticket.arrival, ticket.deadline, now, self.starvation_s)

    async def pump(self) -> None:
        """One pass over the waiting requests, in order."""
        now = self.clock()
        blocked: set[str] = set()  # a model whose earlier request is waiting: its later ones wait too
        for ticket in sorted(self.waiting, key=lambda t: self._key(t, now)):
            if ticket.future.done():
                self._drop(ticket)
                continue
            managed = ticket.managed
            if managed.state != "active" or managed.engine is None:
                self._drop(ticket)
                ticket.future.set_exception(
                    EngineNotReadyError(
                        f"model {ticket.model!r} stopped serving on this agent ({managed.state}) while the "
                        "request waited"
                    )
                )
                continue
            if ticket.model in blocked:
                continue
            if managed.slo.shed_load and now > ticket.deadline:
                self._drop(ticket)
                self.shed += 1
                waited = now - ticket.arrival
                ticket.future.set_exception(
                    ShedError(
                        f"model {ticket.model!r} is overloaded: the request waited {waited:.2f}s for memory, past its "
                        f"TTFT SLO of {managed.slo.ttft_ms:.0f} ms",
                        retry_after_s=max(1, math.ceil(waited)),
                    )
                )
                continue
            if not self._fits(ticket):
                shortfall = self._shortfall_bytes(ticket)
                if not await self.coordinator.grant(managed, shortfall) or ticket.future.done():
                    blocked.add(ticket.model)
                    continue
                if not self._fits(ticket):  # the limit moved meanwhile
                    blocked.add(ticket.model)
                    continue
            self._drop(ticket)
            self._reserve(ticket)
            ticket.future.set_result(None)

    # ---- KV accounting ---------------------------------------------------------------

    def _free_tokens(self, managed: ManagedEngine) -> int:
        """Token slots under the engine's limit that neither its requests nor
        admission's reservations claim. Asked only of engines that have started (_fits, and pump's
        active ones)."""
        engine = managed.started_engine
        stats = engine.stats()
        return free_tokens(
            managed.memory_limit_bytes,
            engine.kv_bytes_per_token,
            stats.kv_demand_tokens,
            stats.kv_used_bytes,
            self._reserved_tokens.get(managed.spec.name, 0),
        )

    def _fits(self, ticket: Ticket) -> bool:
        return ticket.managed.engine is not None and ticket.tokens <= self._free_tokens(ticket.managed)

    def _shortfall_bytes(self, ticket: Ticket) -> int:
        return shortfall_bytes(
            ticket.tokens, self._free_tokens(ticket.managed), ticket.managed.started_engine.kv_bytes_per_token
        )

    def _reserve(self, ticket: Ticket) -> None:
        ticket.reserved = True
        self._reserved_tokens[ticket.model] = self._reserved_tokens.get(ticket.model, 0) + ticket.tokens
        self.admitted += 1

    def _unreserve(self, ticket: Ticket) -> None:
        ticket.reserved = False
        left = self._reserved_tokens.get(ticket.model, 0) - ticket.tokens
        if left > 0:
            self._reserved_tokens[ticket.model] = left
        else:
            self._reserved_tokens.pop(ticket.model, None)

    def send_back(self, managed: ManagedEngine, error: Exception) -> int:
        """Ends the waits of the engine's queued requests with `error` (its
        drain began: they go back to the gateway); how many."""
        tickets = [t for t in self.waiting if t.managed is managed and not t.future.done()]
        for ticket in tickets:
            self._drop(ticket)
            ticket.future.set_exception(error)
        if tickets:
            self.coordinator.poke()
            self.poke()
        return len(tickets)

    def _drop(self, ticket: Ticket) -> None:
        if ticket in self.waiting:
            self.waiting.remove(ticket)

    def _release(self, ticket: Ticket) -> None:
        self._drop(ticket)
        if ticket.reserved:
            self._unreserve(ticket)
        ticket.queue = None
        self.coordinator.poke()
        self.poke()


class AgentAdmission:
    """The agent's admission queues, one per device, each with its coordinator."""

    def __init__(self, queues: dict[int, AdmissionQueue]):
        self.queues = queues

    def queue_for(self, managed: ManagedEngine) -> AdmissionQueue | None:
        return self.queues.get(managed.gpu_ids[0]) if managed.gpu_ids else None

    def send_back_unstarted(self, managed: ManagedEngine, message: str) -> int:
        """A draining engine's requests still waiting for admission end at once with
        DrainingError(message) (UNAVAILABLE with the draining marker: the gateway gives them to
        another replica); how many. Nothing for an engine that is not draining."""
        queue = self.queue_for(managed) if managed.draining else None
        sent = queue.send_back(managed, DrainingError(message)) if queue is not None else 0
        if sent:
            log.info("draining %s: %d queued request(s) sent back to the gateway", managed.spec.name, sent)
        return sent

    def queued(self, model: str) -> int:
        return sum(q.queued(model) for q in self.queues.values())
