"""What the agent needs of an engine, whichever process it runs in:
`InlineEngine` wraps an Engine in the agent's own process (its blocking calls
moved to threads), `workers.remote_engine.RemoteEngine` proxies one in a
worker process. The life-cycle calls are async so both fit; stats() stays
synchronous for the status and load reports."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

from services.gpu_agent.engine import (
    Engine,
    EngineStats,
    GenerationOutput,
    GenerationRequest,
)
from services.gpu_agent.engine.host_weights import ActivationTiming
from services.gpu_agent.engine.kv_pool import MemoryLimitState
from services.gpu_agent.engine.request import ServingPath


class EngineHandle(Protocol):
    name: str
    device: str
    max_context: int
    weight_bytes: int
    kv_bytes_per_token: int
    kv_bundle_bytes: int  # the KV limit's granularity
    serving_path: ServingPath

    def stats(self) -> EngineStats: ...

    def count_prompt_tokens(self, req: GenerationRequest) -> int:
        """The request's prompt length in tokens (admission reserves KV by it);
        raises InvalidRequestError for a prompt the engine would refuse."""

    def generate(self, req: GenerationRequest) -> AsyncIterator[GenerationOutput]: ...

    async def activate(self) -> ActivationTiming | None: ...

    async def deactivate(self) -> None: ...

    async def set_memory_limit(self, nbytes: int, revision: int | None = None) -> MemoryLimitState: ...

    async def stop(self) -> None: ...


class InlineEngine:
    """An Engine in this process behind the EngineHandle interface."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.name = engine.name
        self.device = engine.device
        self.max_context = engine.max_context
        self.weight_bytes = engine.weight_bytes
        self.kv_bytes_per_token = engine.kv_bytes_per_token
        self.kv_bundle_bytes = engine.kv_bundle_bytes
        self.serving_path = engine.serving_path

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def count_prompt_tokens(self, req: GenerationRequest) -> int:
        return len(self.engine.tokenize_prompt(req))

    def generate(self, req: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        return self.engine.generate(req)

    async def activate(self) -> ActivationTiming | None:
        return await asyncio.to_thread(self.engine.activate)

    async def deactivate(self) -> None:
        await asyncio.to_thread(self.engine.deactivate)

    async def set_memory_limit(self, nbytes: int, revision: int | None = None) -> MemoryLimitState:
        # Only takes the engine's lock, never across a model step: fast enough for the loop.
        return self.engine.set_memory_limit(nbytes, revision)

    async def stop(self) -> None:
        await asyncio.to_thread(self.engine.stop)
