"""What one client may ask of the gateway: request size, prompt length,
max_tokens, generations in flight and request rate. The gateway's flags set
the defaults; an API key's entry may override any of them
(services/gateway/auth.py). Everything here is pure or takes its clock as an
argument, so it is tested without sleeping.

Defaults: the size limits are on (they stop absurd inputs before they cost
anything), the rate and concurrency limits are off: without API keys every
client is the one `anonymous` client, and a per-client cap would cap the
whole cluster, whose capacity the gateway does not know.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypedDict, cast

from prism_client.v1 import generate_pb2
from services.gateway.errors import MaxTokensTooLarge, PromptTooLong

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024  # gRPC's own default message limit, so both APIs agree
DEFAULT_MAX_PROMPT_CHARS = 1_000_000  # ~250k tokens: more than any served context; the engine checks the context
DEFAULT_MAX_TOKENS_CAP = 65_536


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # the request body (REST) or message (gRPC)
    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS  # the prompt, or all chat messages' contents together
    max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP  # the largest max_tokens a request may ask for
    # Generations in flight, streamed or not (a non-streamed one holds an engine slot as long); 0: no limit.
    max_concurrent_streams: int = 0
    rate_limit_rps: float = 0.0  # requests per second, sustained; 0: no limit
    rate_limit_burst: int = 0  # requests at once after a quiet spell; 0: one second's worth (at least 1)

    def with_overrides(self, overrides: LimitOverrides) -> Limits:
        return dataclasses.replace(self, **overrides)

    @property
    def bucket_size(self) -> int:
        return self.rate_limit_burst or max(1, math.ceil(self.rate_limit_rps))


class LimitOverrides(TypedDict, total=False):
    """An API key's overrides of the gateway's limits (its `limits:` in the keys file): any of Limits' fields."""

    max_request_bytes: int
    max_prompt_chars: int
    max_tokens_cap: int
    max_concurrent_streams: int
    rate_limit_rps: float
    rate_limit_burst: int


# name -> (type, smallest allowed value); the names are both the keys file's and (dashed) the flags'.
LIMIT_FIELDS: dict[str, tuple[type, float]] = {
    "max_request_bytes": (int, 1),
    "max_prompt_chars": (int, 1),
    "max_tokens_cap": (int, 1),
    "max_concurrent_streams": (int, 0),
    "rate_limit_rps": (float, 0.0),
    "rate_limit_burst": (int, 0),
}


def limit_problem(name: str, value: Any) -> str | None:
    """Why `value` cannot be limit `name`, or None when it can."""
    kind, smallest = LIMIT_FIELDS[name]
    numeric = isinstance(value, int) or (kind is float and isinstance(value, float))
    if isinstance(value, bool) or not numeric or (isinstance(value, float) and not math.isfinite(value)):
        return f"{name} must be {'a whole number' if kind is int else 'a number'}, got {value!r}"
    if value < smallest:
        return f"{name} must be at least {smallest:g}, got {value!r}"
    return None


def parse_limit_overrides(raw: Any, where: str) -> LimitOverrides:
    """A keys file entry's `limits:` mapping, checked; raises ValueError naming `where`."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: limits must be a mapping of limit names to numbers")
    overrides: dict[str, int | float] = {}
    for name, value in raw.items():
        if name not in LIMIT_FIELDS:
            raise ValueError(f"{where}: unknown limit {name!r} (known: {', '.join(LIMIT_FIELDS)})")
        problem = limit_problem(name, value)
        if problem is not None:
            raise ValueError(f"{where}: {problem}")
        overrides[name] = float(value) if LIMIT_FIELDS[name][0] is float else value
    # Each name checked to be a limit's and each value of that limit's type: what LimitOverrides says (a
    # TypedDict takes no key computed at run time, so the checked mapping is cast to it).
    return cast(LimitOverrides, overrides)


# ---- per-request checks ---------------------------------------------------------


def prompt_chars(request: generate_pb2.GenerateRequest) -> int:
    if request.WhichOneof("input") == "chat":
        return sum(len(message.content) for message in request.chat.messages)
    return len(request.prompt)


def check_generate_limits(request: generate_pb2.GenerateRequest, limits: Limits) -> None:
    """Raises PromptTooLong or MaxTokensTooLarge. Characters, not tokens: the
    gateway has no tokenizer (the engine, which has, checks the context)."""
    chars = prompt_chars(request)
    if chars > limits.max_prompt_chars:
        param = "messages" if request.WhichOneof("input") == "chat" else "prompt"
        raise PromptTooLong(
            f"{param} has {chars} characters, over this client's limit of {limits.max_prompt_chars}", param=param
        )
    sampling = request.sampling
    # An unset max_tokens (chat) means the rest of the model's context, which the engine bounds.
    if sampling.HasField("max_tokens") and sampling.max_tokens > limits.max_tokens_cap:
        raise MaxTokensTooLarge(
            f"max_tokens is {sampling.max_tokens}, over this client's limit of {limits.max_tokens_cap}",
            param="max_tokens",
        )


# ---- request rate -----------------------------------------------------------------


def retry_after_seconds(wait_s: float) -> int:
    """Retry-After is whole seconds: rounded up (a client retrying sooner is refused again), at least 1.
    The nanosecond slack keeps float noise (2.0000000001) from adding a second."""
    return max(1, math.ceil(wait_s - 1e-9))


class TokenBucket:
    """`size` tokens, refilled at `rate_per_s`; a request takes one. `now` is
    a monotonic time in seconds, passed in so tests choose it."""

    def __init__(self, rate_per_s: float, size: int, now: float):
        self.rate_per_s = rate_per_s
        self.size = size
        self.tokens = float(size)
        self._last = now

    def take(self, now: float) -> float:
        """0.0 when a token was taken, else the seconds until one will be there."""
        self.tokens = min(float(self.size), self.tokens + max(0.0, now - self._last) * self.rate_per_s)
        self._last = max(self._last, now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s


class RateLimiter:
    """One token bucket per client name (keys are configured, so the set is bounded)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, client: str, limits: Limits) -> float:
        """0.0 when the request may go ahead, else the seconds until it could."""
        if limits.rate_limit_rps <= 0:
            return 0.0
        now = self._clock()
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = self._buckets[client] = TokenBucket(limits.rate_limit_rps, limits.bucket_size, now)
        return bucket.take(now)


# ---- generations in flight ----------------------------------------------------------


class StreamSlot:
    """One generation in flight. release() frees it; calling it again does nothing,
    so every end path (complete, error, cancelled) may call it."""

    def __init__(self, slots: StreamSlots, client: str):
        self._slots = slots
        self._client = client
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._slots._free(self._client)


class StreamSlots:
    def __init__(self) -> None:
        self._in_use: dict[str, int] = {}

    def in_use(self, client: str) -> int:
        return self._in_use.get(client, 0)

    def acquire(self, client: str, limit: int) -> StreamSlot | None:
        """A slot, or None when `client` already has `limit` (0: no limit)."""
        if limit and self.in_use(client) >= limit:
            return None
        self._in_use[client] = self.in_use(client) + 1
        return StreamSlot(self, client)

    def _free(self, client: str) -> None:
        left = self._in_use[client] - 1
        if left:
            self._in_use[client] = left
        else:
            del self._in_use[client]
