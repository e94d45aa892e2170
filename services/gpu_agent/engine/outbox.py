"""Outputs on their way from the engine's step thread to the consumers'
asyncio loops, handed over once per step instead of once per output.

loop.call_soon_threadsafe wakes the loop through its self-pipe: a write from
the step thread, which lets go of the GIL, and a loop woken to run one
callback, which takes it. With one call per output, a step that streams to 64
sequences handed the GIL back and forth 64 times; an eager step (many kernel
launches, each one a point where the GIL is let go) then waited on the event
loop between its launches. One call per loop per step posts them all at once."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

Put = Callable[[Any], None]


class Outbox:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[asyncio.AbstractEventLoop, list[tuple[Put, Any]]] = {}

    def post(self, loop: asyncio.AbstractEventLoop, put: Put, item: Any) -> bool:
        """Queues put(item) to run on loop at the next flush(); False if that
        loop is closed (its consumer is gone)."""
        if loop.is_closed():
            return False
        with self._lock:
            self._pending.setdefault(loop, []).append((put, item))
        return True

    def flush(self) -> None:
        """Hands everything posted so far to its loop, in posting order."""
        with self._lock:
            pending, self._pending = self._pending, {}
        for loop, batch in pending.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # closed since the post: nobody is left to read these
                pass


def _put_all(batch: list[tuple[Put, Any]]) -> None:
    for put, item in batch:
        put(item)
