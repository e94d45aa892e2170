"""Shared by the engine tests: run requests together while watching how many
the engine runs at once (proof that they were batched, not served in turn)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable


async def gather_watching_running(engine, aws: list[Awaitable]) -> tuple[list, int]:
    """The awaitables' results, and the most requests the engine ran at once meanwhile."""
    most_running = 0

    async def watch() -> None:
        nonlocal most_running
        while True:
            most_running = max(most_running, engine.stats().running_requests)
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    try:
        results = await asyncio.gather(*aws)
    finally:
        watcher.cancel()
    return results, most_running
