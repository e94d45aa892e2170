"""Failures of engine worker processes, as engine errors so the agent's
existing mapping (gRPC INTERNAL, the engine marked failed) applies."""

from __future__ import annotations

from services.gpu_agent.engine.errors import EngineError


class WorkerStartError(EngineError):
    """A worker process exited or timed out before it was ready to serve."""


class WorkerLostError(EngineError):
    """The worker process died (or its socket broke) while holding an engine;
    every in-flight request on it ends with this error."""


# A worker ends itself with this code when a step of its split (tensor-parallel) model failed on its rank,
# or its rank 0 went: the ranks are out of step, nothing on it can run again (the agent reports the engine
# failed and ends the other ranks). Its log says why.
EXIT_SPLIT_STEP_FAILED = 70
