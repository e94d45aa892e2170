"""Continuous batching: which sequences run in the next step, and how many of
their tokens, under a per-step token budget and the KV pool's memory limit.

Every step, sequences join and leave the batch:
1. If the pool holds more memory than its (lowered) limit allows, the most
   recently admitted sequences are preempted until it does not.
2. Decoding sequences, oldest first, each get one slot for their new token.
3. Sequences part-way through a prefill continue with their next chunk.
4. Waiting sequences are admitted first come, first served, with a first
   chunk of their prompt, while the budget and the pool allow.
A sequence that cannot get a slot preempts the newest running sequence (its
slots are freed and it waits at the head of the queue to be recomputed,
keeping the tokens it generated) or, if it is the newest, itself.

With a prefix cache (prefix_cache.py), an admitted sequence starts after the
longest chain of cached blocks its tokens begin with, and a sequence that
ends or is preempted leaves its full blocks there. Memory the cache alone
keeps is given back before anything else: before a sequence is preempted
for slots, and first when the limit drops below what is mapped.

A limit can drop below what one sequence needs alone (the memory went to
another model for a while): such a sequence is preempted too and waits until
the limit grows again, while the sequences behind it that do fit go ahead.
Only a sequence larger than the pool's whole reservation, which no limit can
ever fit, is failed ("too big"); the engine rejects at submission what does
not fit the limit at that moment, so nothing waits on a limit nobody raised.

Not thread safe: the engine holds its lock around every call."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from services.common.step_costs import DEFAULT_STEP_TOKENS
from services.gpu_agent.engine.kv_pool import KVPool
from services.gpu_agent.engine.prefix_cache import PrefixCache
from services.gpu_agent.engine.sequence import Sequence

# The step budget (DEFAULT_STEP_TOKENS, CUDA_STEP_TOKENS in services/common/step_costs.py, which the
# scheduler's compute model reads too). A GPU step's is larger: an eager prefill step costs
# milliseconds of kernel launches whatever its length, so a 1536-token prompt in 512-token chunks
# reached its first token in 41 ms on an H100 (3B) against 19 ms in one step
# (bench/probe/prefill_chunks.py); a 2048-token step of the 3B model holds decoding sequences back
# about 25 ms, well inside a 50 ms TPOT target.
DEFAULT_MAX_RUNNING = 256


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int  # first new position (= tokens already cached)
    count: int  # new tokens this step

    @property
    def samples(self) -> bool:
        """The step reaches the sequence's last token, so it samples the next."""
        return self.start + self.count == len(self.seq.token_ids)


@dataclass
class ScheduleResult:
    batch: list[ScheduledSeq] = field(default_factory=list)  # decoding ones first
    too_big: list[Sequence] = field(default_factory=list)  # cannot fit even alone; removed
    preempted: list[Sequence] = field(default_factory=list)  # moved back to waiting
    # Admission stopped for want of slots: (the slots the queue's head needed, the pool's free slots then).
    # Under its limit, a kvcached pool can still be short of the pages the card has free.
    kv_short: tuple[int, int] | None = None

    @property
    def num_decode(self) -> int:
        return sum(1 for s in self.batch if s.count == 1 and s.start > 0 and s.samples)


class BatchScheduler:
    def __init__(
        self,
        pool: KVPool,
        step_tokens: int = DEFAULT_STEP_TOKENS,
        max_running: int = DEFAULT_MAX_RUNNING,
        cache: PrefixCache | None = None,
    ):
        if step_tokens < 1:
            raise ValueError(f"the step token budget must be at least 1, got {step_tokens}")
        self.pool = pool
        self.cache = cache
        self.step_tokens = step_tokens
        self.max_running = max_running
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order: the newest is last

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def demand_tokens(self, growth: int) -> int:
        """Token slots the running and waiting sequences need: all their tokens
        so far (a waiting one must recompute its KV) and up to `growth` more
        each, bounded by what each may still generate."""
        return sum(
            len(seq.token_ids) + min(growth, max(0, seq.max_tokens - seq.num_output))
            for seq in (*self.running, *self.waiting)
        )

    def fits_alone(self, num_tokens: int) -> bool:
        """Whether a sequence of num_tokens and one more token fits under the limit by itself."""
        return num_tokens + 1 <= self.pool.limit_tokens

    def fits_ever(self, num_tokens: int) -> bool:
        """Whether it would fit under the largest limit the pool can take."""
        return num_tokens + 1 <= self.pool.capacity_tokens

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Takes a sequence out (finished or aborted) and frees its slots."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        slots = seq.slots
        if self.cache is not None:  # its computed blocks stay cached; the rest is freed
            slots = self.cache.release(seq.cache_blocks, seq.token_ids, seq.slots, seq.num_cached)
        self.pool.free(slots)
        seq.slots = []
        seq.cache_blocks = []
        seq.num_cached = 0

    # ---- the prefix cache ----------------------------------------------------------

    def _match(self, seq: Sequence) -> None:
        """A sequence about to be admitted starts from the cached blocks its tokens begin with."""
        if self.cache is None or seq.slots:
            return
        seq.cache_blocks = self.cache.match(seq.token_ids)
        seq.slots = [slot for block in seq.cache_blocks for slot in block.slots]
        seq.num_cached = len(seq.slots)

    def _unmatch(self, seq: Sequence) -> None:
        """Not admitted after all: the cached blocks it matched are let go."""
        if self.cache is not None and seq.cache_blocks:
            self.cache.unmatch(seq.cache_blocks)
        seq.cache_blocks, seq.slots, seq.num_cached = [], [], 0

    def _evict(self, tokens: int) -> bool:
        """Frees at least `tokens` slots that only the cache keeps (fewer if it has fewer); False if
        it had none."""
        if self.cache is None:
            return False
        freed = self.cache.evict(max(1, tokens))
        self.pool.free(freed)
        return bool(freed)

    def _alloc(self, n: int) -> list[int] | None:
        """pool.alloc, giving back cached blocks while it does not fit."""
        while True:
            slots = self.pool.alloc(n)
            if slots is not None or not self._evict(n - self.pool.free_tokens):
                return slots

    def shed_cache_over_limit(self) -> None:
        """Gives back cached blocks, least recently used first, while the pool maps more than its limit."""
        while self.pool.over_limit and self._evict(self.pool.tokens_per_page):
            pass

    def drop_cache(self) -> None:
        """Frees every cached block (no sequence may be left: the engine is being switched off)."""
        if self.cache is not None:
            self.pool.free(self.cache.clear())

    def _preempt(self, seq: Sequence, result: ScheduleResult) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.preemptions += 1
        self.waiting.appendleft(seq)
        result.preempted.append(seq)
        result.batch = [s for s in result.batch if s.seq is not seq]

    def _reserve(self, seq: Sequence, count: int, result: ScheduleResult, prefetched: list[int]) -> bool:
        """Slots for seq's next `count` tokens, preempting newer sequences if
        needed; False if seq itself had to go. A decoding sequence's one slot
        comes from `prefetched` while it lasts."""
        need = seq.num_cached + count - len(seq.slots)
        if need == 1 and prefetched:
            seq.slots.append(prefetched.pop())
            return True
        while True:
            slots = self._alloc(need) if need > 0 else []
            if slots is not None:
                seq.slots.extend(slots)
                return True
            victim = self.running[-1]
            self._preempt(victim, result)
            if victim is seq:
                return False

    def schedule(self) -> ScheduleResult:
        result = ScheduleResult()
        # 1. A lowered limit takes effect now, not only when sequences grow: the cache's memory goes first.
        self.shed_cache_over_limit()
        while self.running and self.pool.over_limit:
            self._preempt(self.running[-1], result)
        budget = self.step_tokens
        # 2, 3: running sequences, decoding ones first (they cost one token each).
        order = sorted(self.running, key=lambda s: not s.decoding)
        # The decoding sequences' next slots in one allocation where they fit (the
        # common case), not one call each; otherwise one at a time, preempting.
        decoding = sum(1 for s in order[:budget] if s.decoding)
        prefetched = (self.pool.alloc(decoding) or []) if decoding > 1 else []
        for seq in order:
            if budget == 0:
                break
            if seq in result.preempted:
                continue  # preempted for an older sequence this step
            if not self.fits_ever(len(seq.token_ids)):
                self.running.remove(seq)
                self._release(seq)
                result.too_big.append(seq)
                continue
            if not self.fits_alone(len(seq.token_ids)):
                self._preempt(seq, result)  # waits for the limit to grow back
                continue
            count = min(seq.num_uncached, budget)
            if self._reserve(seq, count, result, prefetched):
                result.batch.append(ScheduledSeq(seq, seq.num_cached, count))
                budget -= count
        if prefetched:  # some decoding sequences left (preempted, too big) before taking theirs
            self.pool.free(prefetched)
        # 4. Admission, first come first served: nobody overtakes a sequence
        #    that fits the limit (those that do not, wait for it to grow).
        position = 0
        while (
            position < len(self.waiting)
            and budget > 0
            and len(self.running) < self.max_running
            and not self.pool.over_limit
        ):
            seq = self.waiting[position]
            if not self.fits_ever(len(seq.token_ids)):
                del self.waiting[position]
                result.too_big.append(seq)
                continue
            if not self.fits_alone(len(seq.token_ids)):
                position += 1
                continue
            if seq in result.preempted:
                break  # it just lost its memory: not back in the same step
            self._match(seq)
            count = min(seq.num_uncached, budget)
            # Keep a slot free for each decoding sequence's next token, so
            # admitting does not force a preemption on the very next step.
            headroom = sum(1 for s in self.running if s.decoding)
            while self.pool.free_tokens < count + headroom and self._evict(count + headroom - self.pool.free_tokens):
                pass
            slots = self._alloc(count) if self.pool.free_tokens >= count + headroom else None
            if slots is None:
                self._unmatch(seq)
                result.kv_short = (count + headroom, self.pool.free_tokens)
                break
            del self.waiting[position]
            if self.cache is not None:
                self.cache.count_admitted(len(seq.token_ids), seq.num_cached)
                if seq.preemptions == 0:
                    seq.cached_prompt_tokens = seq.num_cached
            seq.slots.extend(slots)
            self.running.append(seq)
            result.batch.append(ScheduledSeq(seq, seq.num_cached, count))
            budget -= count
        decode_steps = [s for s in result.batch if s.count == 1 and s.start > 0 and s.samples]
        result.batch = decode_steps + [s for s in result.batch if not (s.count == 1 and s.start > 0 and s.samples)]
        return result
