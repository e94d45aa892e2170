"""Failures of engine worker processes, as engine errors so the agent's
existing mapping (gRPC INTERNAL, the engine marked failed) applies."""

from __future__ import annotations

from services.gpu_agent.engine.errors import EngineError


class WorkerStartError(EngineError):
    """A worker process exited or timed out before it was ready to serve."""


class WorkerLostError(EngineError):
    """The worker process died (or its socket broke) while holding an engine;
    every in-flight request on it ends with this error."""
