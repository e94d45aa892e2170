"""Each sequence's KV slots, mirrored from a split model's rank 0 to its
other ranks a step at a time: a step message carries only the slots a
follower has not seen (one a decoding sequence, not its whole list).

Rank 0 (SlotsSent) remembers, per sequence, the slot list it last sent and
how much of it. A sequence's list only grows in place while it runs; the
batch scheduler gives it a new list when it rebuilds it (preempted, or
matched in the prefix cache), and then the whole list goes again ("fresh").
A sequence that has finished is forgotten on both sides at the next step.
The followers (SlotsKnown) apply the updates and hand the forward the same
(start, count, slots) spans rank 0's forward has.

Sending every list whole cost a step message O(context x batch) slot ids: at
batch 64 and 2k tokens of context, about 128k ids a step, pickled and
broadcast before every forward."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

# (sequence key, start, count, slots past those the followers have, fresh: the list whole)
SpanUpdate = tuple[int, int, int, list[int], bool]
Span = tuple[int, int, list[int]]  # (start, count, slots of positions 0..start+count): build_step_attention's


class Finishable(Protocol):
    finished: bool


class SlotsSent:
    """Rank 0's side: what the followers know of each sequence's slots."""

    def __init__(self) -> None:
        # key -> (the sequence (held, so its key is not reused while here), the list sent, how much of it)
        self._sent: dict[int, tuple[Finishable, list[int], int]] = {}

    def updates(self, spans: Iterable[tuple[Finishable, int, int, list[int]]]) -> tuple[list[SpanUpdate], list[int]]:
        """For a step's (sequence, start, count, its slots): the updates to send, and the keys of the
        sequences that have finished (the followers forget them after this step's updates)."""
        out: list[SpanUpdate] = []
        for seq, start, count, slots in spans:
            key = id(seq)
            known = self._sent.get(key)
            if known is not None and known[1] is slots and known[2] <= len(slots):
                out.append((key, start, count, slots[known[2] :], False))
            else:
                out.append((key, start, count, list(slots), True))
            self._sent[key] = (seq, slots, len(slots))
        finished = [key for key, (seq, _, _) in self._sent.items() if seq.finished]
        for key in finished:
            del self._sent[key]
        return out, finished

    def clear(self) -> None:
        """Switching off: every sequence has ended and the followers forget them all."""
        self._sent.clear()

    def __len__(self) -> int:
        return len(self._sent)


class SlotsKnown:
    """A follower's side: each sequence's slots as rank 0 has them."""

    def __init__(self) -> None:
        self._slots: dict[int, list[int]] = {}

    def spans(self, updates: list[SpanUpdate], finished: list[int]) -> list[Span]:
        out: list[Span] = []
        for key, start, count, slots, fresh in updates:
            if fresh:
                self._slots[key] = slots
            else:
                self._slots[key].extend(slots)
            out.append((start, count, self._slots[key]))
        for key in finished:
            self._slots.pop(key, None)
        return out

    def clear(self) -> None:
        self._slots.clear()

    def __len__(self) -> int:
        return len(self._slots)
