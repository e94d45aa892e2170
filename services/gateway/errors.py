"""The gateway's errors: each knows its HTTP status, its gRPC code and its
OpenAI error `type`/`code`, so REST and gRPC report the same failure alike."""

from __future__ import annotations

from typing import Any

import grpc

from services.common.grpc_util import RETRY_AFTER_KEY


class GatewayError(Exception):
    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL
    error_type = "server_error"
    error_code: str | None = "internal_error"
    # The reason label of prism_gateway_rejected_requests_total when the gateway's own access control
    # (services/gateway/access.py) refuses a request with this error; None for every other failure.
    rejection: str | None = None

    def __init__(self, message: str, *, param: str | None = None, retry_after_s: int | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = retry_after_s  # sent as Retry-After (REST) / retry-after (gRPC trailer)

    def http_headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}


class InvalidRequest(GatewayError):
    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    error_type = "invalid_request_error"
    error_code = "invalid_value"


class MissingParameter(InvalidRequest):
    error_code = "missing_required_parameter"


class PromptTooLong(InvalidRequest):
    error_code = "prompt_too_long"
    rejection = "prompt_too_long"


class MaxTokensTooLarge(InvalidRequest):
    rejection = "max_tokens"


class Unauthenticated(GatewayError):
    """No API key, or one the gateway does not know (OpenAI answers a bad key alike)."""

    http_status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    error_type = "invalid_request_error"
    error_code = "invalid_api_key"
    rejection = "auth"

    def http_headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="prism"'}  # RFC 6750: how to authenticate


class ModelNotAllowed(GatewayError):
    http_status = 403
    grpc_code = grpc.StatusCode.PERMISSION_DENIED
    error_type = "invalid_request_error"
    error_code = "model_not_allowed"
    rejection = "forbidden"


class RequestTooLarge(GatewayError):
    http_status = 413
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED  # what gRPC itself answers a message over its size limit
    error_type = "invalid_request_error"
    error_code = "request_too_large"
    rejection = "too_large"


class ModelNotFound(GatewayError):
    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND
    error_type = "invalid_request_error"
    error_code = "model_not_found"


class RateLimited(GatewayError):
    http_status = 429
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    error_type = "rate_limit_error"
    error_code = "resource_exhausted"


class KeyRateLimited(RateLimited):
    """The client's own request rate is over its limit (not the cluster shedding load)."""

    error_code = "rate_limit_exceeded"
    rejection = "rate_limited"


class TooManyStreams(RateLimited):
    error_code = "too_many_concurrent_requests"
    rejection = "too_many_streams"


class ModelUnavailable(GatewayError):
    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    error_type = "service_unavailable_error"
    error_code = "model_unavailable"


class GatewayTimeout(GatewayError):
    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    error_type = "timeout_error"
    error_code = "timeout"


class InternalError(GatewayError):
    pass


class ClientGone(Exception):
    """The client went away before its answer was complete (nginx's 499)."""

    http_status = 499


AGENT_REFUSAL_RETRY_AFTER_S = 1

_BY_AGENT_CODE: dict[grpc.StatusCode, type[GatewayError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: ModelNotFound,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimited,
    grpc.StatusCode.UNAVAILABLE: ModelUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: GatewayTimeout,
}


def retry_after_of(trailing_metadata) -> int | None:
    for key, value in trailing_metadata or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(1, int(value))
            except ValueError:
                return None
    return None


def from_agent_error(
    code: grpc.StatusCode,
    details: str | None,
    *,
    model: str,
    request_id: str,
    timeout_s: float,
    retry_after_s: int | None = None,
) -> GatewayError:
    """The gateway error for an agent's failed Generate call."""
    details = details or code.name
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        # Every 429 says when to come back: the agent's own hint (its shedder's), else a second (no room to
        # switch the model on now: the busy engines' window moves on).
        return RateLimited(
            details, retry_after_s=retry_after_s if retry_after_s is not None else AGENT_REFUSAL_RETRY_AFTER_S
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        return ModelUnavailable(f"model {model!r} is unavailable: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return GatewayTimeout(f"request {request_id} did not finish within {timeout_s:g}s")
    error_class = _BY_AGENT_CODE.get(code)
    if error_class is not None:
        return error_class(details)
    # Unexpected failures carry the id so an operator can find the agent's log lines.
    return InternalError(f"request {request_id} failed on the serving agent ({code.name}): {details}")


def error_body(error: GatewayError, request_id: str) -> dict[str, Any]:
    """The OpenAI-style error object; `request_id` is our addition."""
    return {
        "error": {
            "message": error.message,
            "type": error.error_type,
            "param": error.param,
            "code": error.error_code,
            "request_id": request_id,
        }
    }
