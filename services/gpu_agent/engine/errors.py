"""Engine errors, by what the caller should tell its client: the agent maps
them to gRPC codes (and the gateway to HTTP statuses)."""

from __future__ import annotations


class EngineError(Exception):
    """The engine failed (gRPC INTERNAL)."""


class InvalidRequestError(EngineError):
    """The request itself is wrong; the message says what (INVALID_ARGUMENT)."""


class CapacityError(EngineError):
    """The request can never fit under the engine's memory limit (RESOURCE_EXHAUSTED)."""


class EngineInactiveError(EngineError):
    """The engine is deactivated (its weights are off the device)."""
