"""Access control shared by the REST and gRPC APIs: who the client is (its
API key), whether it may use a model, and whether a request is within its
limits. Every refusal raises a GatewayError (401, 403, 413, 400, 429 /
UNAUTHENTICATED, PERMISSION_DENIED, RESOURCE_EXHAUSTED, INVALID_ARGUMENT)
and counts in prism_gateway_rejected_requests_total; all of it happens
before a request reaches the relay, so nothing refused ever occupies an
agent.

Without keys every client is the one client `anonymous` with the default
limits, rather than one client per remote address: the state stays bounded,
and behind a proxy every address is the proxy's anyway (X-Forwarded-For is
whatever the client writes). Give clients keys to limit them one by one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from prism_client.v1 import generate_pb2
from services.gateway.auth import ANONYMOUS, KeyStore, bearer_token
from services.gateway.errors import (
    GatewayError,
    KeyRateLimited,
    ModelNotAllowed,
    RequestTooLarge,
    TooManyStreams,
    Unauthenticated,
)
from services.gateway.limits import (
    Limits,
    RateLimiter,
    StreamSlot,
    StreamSlots,
    check_generate_limits,
    retry_after_seconds,
)
from services.gateway.metrics import GatewayMetrics

REST = "rest"
GRPC = "grpc"
UNAUTHENTICATED = "unauthenticated"  # the key label of refusals before the key is known


@dataclass(frozen=True)
class Client:
    name: str
    models: frozenset[str] | None  # None: every model
    limits: Limits

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


class AccessControl:
    def __init__(
        self,
        keys: KeyStore,
        defaults: Limits,
        metrics: GatewayMetrics,
        *,
        metrics_auth: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.keys = keys
        self.metrics = metrics
        self.metrics_auth = metrics_auth and keys.enabled  # no keys: nothing to ask for
        self._clients = {
            key.digest: Client(key.name, key.models, defaults.with_overrides(key.limits)) for key in keys.keys
        }
        self._anonymous = Client(ANONYMOUS, None, defaults)
        self._rates = RateLimiter(clock)
        self.streams = StreamSlots()

    @property
    def largest_request_bytes(self) -> int:
        """The largest request any client may send (gRPC's transport limit)."""
        return max(c.limits.max_request_bytes for c in (self._anonymous, *self._clients.values()))

    def _refuse(self, error: GatewayError, api: str, client: str) -> GatewayError:
        self.metrics.rejected.labels(api, error.rejection or "other", client).inc()
        return error

    def authenticate(self, authorization: str | None, api: str) -> Client:
        """The client of an `Authorization: Bearer <key>` value; raises Unauthenticated."""
        if not self.keys.enabled:
            return self._anonymous
        token = bearer_token(authorization)
        if token is None:
            raise self._refuse(
                Unauthenticated(
                    "no API key: send it as 'Authorization: Bearer <key>'"
                    if not authorization
                    else "the Authorization header must be 'Bearer <key>'"
                ),
                api,
                UNAUTHENTICATED,
            )
        key = self.keys.find(token)
        if key is None:
            # Never echo the key: it may be a real key of another system, pasted by mistake.
            raise self._refuse(Unauthenticated("invalid API key"), api, UNAUTHENTICATED)
        return self._clients[key.digest]

    def admit(self, client: Client, api: str) -> None:
        """Takes one request from the client's rate limit; raises KeyRateLimited."""
        wait_s = self._rates.take(client.name, client.limits)
        if wait_s > 0:
            retry_after = retry_after_seconds(wait_s)
            raise self._refuse(
                KeyRateLimited(
                    f"rate limit of {client.limits.rate_limit_rps:g} requests/s reached for {client.name!r}; "
                    f"retry in {retry_after}s",
                    retry_after_s=retry_after,
                ),
                api,
                client.name,
            )

    def too_large(self, client: Client, api: str) -> GatewayError:
        """The (counted) refusal of a request over the client's size limit, for the caller to raise."""
        return self._refuse(
            RequestTooLarge(
                f"the request is larger than this client's limit of {client.limits.max_request_bytes} bytes"
            ),
            api,
            client.name,
        )

    def check_size(self, client: Client, size: int, api: str) -> None:
        if size > client.limits.max_request_bytes:
            raise self.too_large(client, api)

    def check_model(self, client: Client, model: str, api: str) -> None:
        # By the allow-list alone, whether the model exists or not: a 403 tells nothing about other models.
        if not client.may_use(model):
            raise self._refuse(
                ModelNotAllowed(f"this API key may not use the model {model!r}", param="model"), api, client.name
            )

    def check_generate(self, client: Client, request: generate_pb2.GenerateRequest, api: str) -> None:
        """The model and the request's own limits; raises ModelNotAllowed, PromptTooLong, MaxTokensTooLarge."""
        self.check_model(client, request.model, api)
        try:
            check_generate_limits(request, client.limits)
        except GatewayError as error:
            raise self._refuse(error, api, client.name) from None

    def open_stream(self, client: Client, api: str) -> StreamSlot:
        """A slot for one generation in flight; release it however the generation ends."""
        slot = self.streams.acquire(client.name, client.limits.max_concurrent_streams)
        if slot is None:
            raise self._refuse(
                TooManyStreams(
                    f"{client.name!r} already has {client.limits.max_concurrent_streams} generations in flight; "
                    "retry when one ends"
                ),
                api,
                client.name,
            )
        return slot
