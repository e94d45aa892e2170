"""Which sequences run in the next step, under the KV memory limit.

KV is counted in token slots (bytes = slots * kv_bytes_per_token). A waiting
sequence is admitted, first come first served, when its tokens plus one more
fit. A running sequence grows by one slot per step; if the limit does not
allow that, the most recently admitted sequence is preempted: its KV is
dropped and it waits at the head of the queue to be recomputed, keeping the
tokens it generated. Not thread safe: the engine holds its lock around every
call."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from services.gpu_agent.engine.sequence import Sequence


@dataclass
class ScheduleResult:
    batch: list[Sequence] = field(default_factory=list)  # run these now
    too_big: list[Sequence] = field(default_factory=list)  # cannot fit even alone; removed
    preempted: list[Sequence] = field(default_factory=list)  # moved back to waiting


class Scheduler:
    def __init__(self, kv_bytes_per_token: int, memory_limit_bytes: int, max_running: int = 256):
        self.kv_bytes_per_token = kv_bytes_per_token
        self.memory_limit_bytes = memory_limit_bytes
        self.max_running = max_running
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.reserved_tokens = 0

    @property
    def limit_tokens(self) -> int:
        return self.memory_limit_bytes // self.kv_bytes_per_token

    @property
    def kv_used_bytes(self) -> int:
        return self.reserved_tokens * self.kv_bytes_per_token

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def fits_alone(self, num_tokens: int) -> bool:
        """Whether a sequence of num_tokens (and one more) can ever be admitted."""
        return num_tokens + 1 <= self.limit_tokens

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Takes a sequence out (finished or aborted) and frees its KV."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self.reserved_tokens -= seq.reserved_tokens
        seq.reserved_tokens = 0

    def _preempt(self, seq: Sequence, result: ScheduleResult) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.drop_cache()
        self.waiting.appendleft(seq)
        result.preempted.append(seq)

    def _admit(self, result: ScheduleResult) -> None:
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            need = len(seq.token_ids) + 1
            if not self.fits_alone(len(seq.token_ids)):
                self.waiting.popleft()
                result.too_big.append(seq)
                continue
            if self.reserved_tokens + need > self.limit_tokens:
                break  # first come first served: nobody overtakes the head
            self.waiting.popleft()
            seq.reserved_tokens = need
            self.reserved_tokens += need
            self.running.append(seq)

    def _grow(self, seq: Sequence, result: ScheduleResult) -> bool:
        """Reserves slots for all of seq's tokens; False if seq itself had to go."""
        extra = len(seq.token_ids) - seq.reserved_tokens
        if extra <= 0:
            return True
        if not self.fits_alone(len(seq.token_ids) - 1):
            self.running.remove(seq)
            self._release(seq)
            result.too_big.append(seq)
            return False
        while self.reserved_tokens + extra > self.limit_tokens:
            victim = self.running[-1]
            self._preempt(victim, result)
            if victim is seq:
                return False
        seq.reserved_tokens += extra
        self.reserved_tokens += extra
        return True

    def schedule(self) -> ScheduleResult:
        result = ScheduleResult()
        # A lowered limit takes effect now, not only when sequences grow.
        while self.running and self.reserved_tokens > self.limit_tokens:
            self._preempt(self.running[-1], result)
        self._admit(result)
        for seq in list(self.running):
            if seq in self.running and self._grow(seq, result):
                result.batch.append(seq)
        return result
