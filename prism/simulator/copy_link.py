"""A GPU's host-to-device link, shared by the weight copies of the engines
switching on there at once.

The profile's activation time is one engine's copy alone (bytes over the
copy bandwidth, plus an overhead). A live agent switches several engines on
at once when a new group's requests arrive together, and their copies share
the link: on the H100 showdown (bench/results/one_gpu-h100-reset.json), eight
engines switched on within a second took 0.24-0.28 s (1B), 0.64-0.66 s (3B)
and 0.79-1.03 s (8B), where alone they take 0.05, 0.13-0.2 and 0.3 s, as the
profile has them. Running copies share the bandwidth equally (processor
sharing): each finishes when its bytes are through at its share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

# A copy this close to done (bytes) counts as done: the shares' float sums leave crumbs.
DONE_BYTES = 1.0


class Clock(Protocol):
    now: float

    def at(self, t: float, fn: Callable[[], None]) -> None: ...


@dataclass(eq=False)
class Copy:
    remaining_bytes: float
    done: Callable[[], None]


class CopyLink:
    """The copies under way on one GPU's link and when the next one ends."""

    def __init__(self, clock: Clock, bytes_per_s: float):
        if bytes_per_s <= 0:
            raise ValueError(f"a copy link needs a positive bandwidth, got {bytes_per_s}")
        self.clock = clock
        self.bytes_per_s = bytes_per_s
        self.copies: list[Copy] = []
        self._since = clock.now  # when the running copies' remaining bytes were last brought up to date
        self._next = 0  # the pending end-of-copy event's number: a later one replaces it

    def start(self, nbytes: float, done: Callable[[], None]) -> None:
        """Starts copying `nbytes`; `done` is called when they are through."""
        self._advance()
        self.copies.append(Copy(float(nbytes), done))
        self._schedule()

    def _advance(self) -> None:
        """Counts the bytes each running copy moved since the last event, at its equal share."""
        now = self.clock.now
        if self.copies:
            moved = (now - self._since) * self.bytes_per_s / len(self.copies)
            for copy in self.copies:
                copy.remaining_bytes -= moved
        self._since = now

    def _schedule(self) -> None:
        self._next += 1
        if not self.copies:
            return
        number = self._next
        least = min(c.remaining_bytes for c in self.copies)
        self.clock.at(
            self.clock.now + max(0.0, least) * len(self.copies) / self.bytes_per_s, lambda: self._ended(number)
        )

    def _ended(self, number: int) -> None:
        if number != self._next:  # a copy started since: its event replaced this one
            return
        self._advance()
        finished = [c for c in self.copies if c.remaining_bytes <= DONE_BYTES]
        self.copies = [c for c in self.copies if c.remaining_bytes > DONE_BYTES]
        self._schedule()
        for copy in finished:
            copy.done()
