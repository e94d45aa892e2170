"""Python client SDK of the `prism.v1.Gateway` gRPC service.

    from prism_client import PrismClient

    with PrismClient("127.0.0.1:50050") as client:
        print(client.generate("tiny-llama", "Hello", max_tokens=16, temperature=0).text)
        for chunk in client.generate_stream("tiny-qwen2", messages=[{"role": "user", "content": "Hi"}]):
            print(chunk.text, end="")

A call that fails UNAVAILABLE before anything came back (the gateway
restarting, no replica up yet) is tried again, up to `retries` more times
(default 3) with exponential backoff and jitter, within the call's deadline;
a stream that has produced tokens is never retried (the caller has them).

A gateway serving TLS: `PrismClient(target, tls_ca="ca.pem")` verifies it
against that CA (`tls_ca=None` with a client certificate: the system's roots);
`tls_cert`/`tls_key` present a client certificate to a gateway that requires
one. Without any of them the channel is plaintext. A gateway with API keys:
`PrismClient(target, api_key="...")` (default: the PRISM_API_KEY environment
variable) sends it as `authorization: Bearer <key>` on every call.

`AsyncPrismClient` has the same methods for asyncio. gRPC failures surface as
`PrismError` subclasses, one per status code a caller would handle
differently; arguments the SDK itself can tell are wrong raise ValueError
before anything is sent.

The SDK is its own distribution (clients/python, `pip install
./clients/python`: prism-client): it depends on grpcio and protobuf alone,
ships the generated stubs of the prism.v1 API (prism_client.v1, which the
services import too), and never imports a service's code.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, TypedDict, Unpack

import grpc

from prism_client.v1 import gateway_pb2, gateway_pb2_grpc, generate_pb2

# The public names are the package's (prism_client/__init__.py's __all__).

DEFAULT_TARGET = "127.0.0.1:50050"
DEFAULT_TIMEOUT_S = 600.0
# The gRPC twin of the REST gateway's X-Request-Id header; read from a failed
# call's metadata when no response carried the id before the failure.
REQUEST_ID_METADATA_KEY = "x-request-id"

FinishReason = Literal["stop", "length"]
_FINISH_REASONS: dict[int, FinishReason] = {
    generate_pb2.FINISH_REASON_STOP: "stop",
    generate_pb2.FINISH_REASON_LENGTH: "length",
}
_CHAT_MESSAGE_KEYS = {"role", "content"}


# --- results -----------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    name: str
    available: bool  # at least one live agent hosts an engine for it
    max_context: int


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0  # of prompt_tokens, those whose KV came from the engine's prefix cache


@dataclass(frozen=True)
class CompletionChunk:
    """One streamed piece: the text decoded since the previous piece. Only the
    last piece has finish_reason and usage."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    usage: Usage | None


@dataclass(frozen=True)
class Completion:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0  # of prompt_tokens, those whose KV came from the engine's prefix cache


# --- errors ------------------------------------------------------------------


class PrismError(Exception):
    """A failed call. `code` is the gRPC status; `request_id` is the id the
    gateway logged the request under, when it is known."""

    def __init__(self, message: str, *, code: grpc.StatusCode, request_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.request_id = request_id

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        return f"{text} (request {self.request_id})" if self.request_id else text


class InvalidRequestError(PrismError):
    """INVALID_ARGUMENT: a parameter, or the prompt's length, was rejected."""


class ModelNotFoundError(PrismError):
    """NOT_FOUND: the cluster has no model of that name."""


class RateLimitedError(PrismError):
    """RESOURCE_EXHAUSTED: retry later."""


class AuthenticationError(PrismError):
    """UNAUTHENTICATED: no API key, or one the gateway does not know."""


class PermissionDeniedError(PrismError):
    """PERMISSION_DENIED: the API key may not use that model."""


class UnavailableError(PrismError):
    """UNAVAILABLE or DEADLINE_EXCEEDED: nothing could serve the request in time."""


_ERROR_CLASSES: dict[grpc.StatusCode, type[PrismError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.NOT_FOUND: ModelNotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimitedError,
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: UnavailableError,
}


def _request_id_from_metadata(exc: grpc.RpcError) -> str | None:
    for getter_name in ("trailing_metadata", "initial_metadata"):
        getter = getattr(exc, getter_name, None)
        try:
            metadata = getter() if getter is not None else None
        except Exception:  # a call that never started has no metadata to read
            metadata = None
        for key, value in metadata or ():
            if key.lower() == REQUEST_ID_METADATA_KEY and value:
                return value if isinstance(value, str) else value.decode()
    return None


def error_from_rpc(exc: grpc.RpcError, request_id: str | None = None) -> PrismError:
    """The typed error for a failed gRPC call (sync or asyncio). `request_id`
    is the id already known from the request or an earlier response."""
    code_getter = getattr(exc, "code", None)
    code = code_getter() if callable(code_getter) else grpc.StatusCode.UNKNOWN
    details_getter = getattr(exc, "details", None)
    details = (details_getter() if callable(details_getter) else None) or code.name
    error_class = _ERROR_CLASSES.get(code, PrismError)
    return error_class(details, code=code, request_id=request_id or _request_id_from_metadata(exc))


# --- requests and responses --------------------------------------------------


class GenerateOptions(TypedDict, total=False):
    """The keyword arguments of every generate method; see build_generate_request."""

    messages: list[dict[str, str]] | None
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    stop: list[str] | str | None
    ignore_eos: bool
    request_id: str | None


def _chat_message(index: int, message: object) -> generate_pb2.ChatMessage:
    if not isinstance(message, dict):
        raise ValueError(f"messages[{index}] must be a dict with 'role' and 'content', got {type(message).__name__}")
    if set(message) != _CHAT_MESSAGE_KEYS:
        raise ValueError(f"messages[{index}] must have exactly the keys 'role' and 'content', got {sorted(message)}")
    role, content = message["role"], message["content"]
    if not isinstance(role, str) or not isinstance(content, str):
        raise ValueError(f"messages[{index}]: 'role' and 'content' must be strings")
    return generate_pb2.ChatMessage(role=role, content=content)


def _stop_strings(stop: list[str] | str | None) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if not all(isinstance(s, str) for s in stop):
        raise ValueError("stop must be a string or a list of strings")
    return list(stop)


def build_generate_request(
    model: str,
    prompt: str | None = None,
    *,
    messages: list[dict[str, str]] | None = None,
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: list[str] | str | None = None,
    ignore_eos: bool = False,
    request_id: str | None = None,
) -> generate_pb2.GenerateRequest:
    """The GenerateRequest for these arguments. Sampling parameters left None
    stay unset, so the engine's defaults apply; their ranges are checked by
    the gateway (InvalidRequestError), the one place that knows the model."""
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt and messages")
    if not isinstance(model, str) or not model:
        raise ValueError("model must be a non-empty string")
    sampling = generate_pb2.SamplingParams(stop=_stop_strings(stop), ignore_eos=ignore_eos)
    if max_tokens is not None:
        sampling.max_tokens = max_tokens
    if temperature is not None:
        sampling.temperature = temperature
    if top_p is not None:
        sampling.top_p = top_p
    if seed is not None:
        sampling.seed = seed
    request = generate_pb2.GenerateRequest(request_id=request_id or "", model=model, sampling=sampling)
    if prompt is not None:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        request.prompt = prompt  # sets the oneof even when empty
    else:
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list")
        # CopyFrom, not messages.extend: the oneof must be set as chat.
        request.chat.CopyFrom(generate_pb2.ChatInput(messages=[_chat_message(i, m) for i, m in enumerate(messages)]))
    return request


def chunk_from_response(response: generate_pb2.GenerateResponse) -> CompletionChunk:
    usage = None
    if response.HasField("usage"):
        usage = Usage(
            prompt_tokens=response.usage.prompt_tokens,
            completion_tokens=response.usage.completion_tokens,
            cached_prompt_tokens=response.usage.cached_prompt_tokens,
        )
    return CompletionChunk(
        request_id=response.request_id,
        text=response.text,
        token_ids=list(response.token_ids),
        finish_reason=_FINISH_REASONS.get(response.finish_reason),
        usage=usage,
    )


def completion_from_chunks(chunks: Iterable[CompletionChunk], request_id: str | None = None) -> Completion:
    """Joins a finished stream. A stream that ends without a finish reason or
    usage broke the Generate contract; that is an error, not a short answer."""
    chunks = list(chunks)
    request_id = next((c.request_id for c in chunks if c.request_id), request_id or "")
    last = chunks[-1] if chunks else None
    if last is None or last.finish_reason is None:
        raise PrismError(
            "the stream ended without a finish reason", code=grpc.StatusCode.UNKNOWN, request_id=request_id or None
        )
    if last.usage is None:
        raise PrismError(
            "the last response carried no usage", code=grpc.StatusCode.UNKNOWN, request_id=request_id or None
        )
    return Completion(
        request_id=request_id,
        text="".join(c.text for c in chunks),
        token_ids=[t for c in chunks for t in c.token_ids],
        finish_reason=last.finish_reason,
        prompt_tokens=last.usage.prompt_tokens,
        completion_tokens=last.usage.completion_tokens,
        cached_prompt_tokens=last.usage.cached_prompt_tokens,
    )


def _model_infos(response: gateway_pb2.ListModelsResponse) -> list[ModelInfo]:
    return [ModelInfo(name=m.name, available=m.available, max_context=m.max_context) for m in response.models]


# --- clients -----------------------------------------------------------------


PemPath = str | os.PathLike[str]


class TlsConfigError(ValueError):
    """tls_ca / tls_cert / tls_key that cannot work: a certificate without its key, a file that cannot be
    read. (A file that is not PEM is found by the TLS handshake: UnavailableError.)"""


def tls_credentials(
    tls_ca: PemPath | None, tls_cert: PemPath | None, tls_key: PemPath | None
) -> grpc.ChannelCredentials | None:
    """The channel's TLS credentials; None (plaintext) when no file is given."""
    if tls_ca is None and tls_cert is None and tls_key is None:
        return None
    if (tls_cert is None) != (tls_key is None):
        given, missing = ("tls_cert", "tls_key") if tls_cert is not None else ("tls_key", "tls_cert")
        raise TlsConfigError(f"{given} needs {missing}: a client certificate goes with its key")

    def read(path: PemPath | None, option: str) -> bytes | None:
        if path is None:
            return None
        try:
            return open(path, "rb").read()
        except OSError as exc:
            raise TlsConfigError(f"{option} {path}: cannot read it ({exc.strerror})") from None

    return grpc.ssl_channel_credentials(
        root_certificates=read(tls_ca, "tls_ca"),
        private_key=read(tls_key, "tls_key"),
        certificate_chain=read(tls_cert, "tls_cert"),
    )


API_KEY_ENV = "PRISM_API_KEY"


# --- retries -----------------------------------------------------------------

DEFAULT_RETRIES = 3
RETRY_BASE_S = 0.1  # the first retry's delay before jitter; each next one doubles, up to RETRY_CAP_S
RETRY_CAP_S = 2.0


def retry_delays(retries: int, rng: random.Random | None = None) -> list[float]:
    """The waits before each retry: exponential from RETRY_BASE_S, capped at RETRY_CAP_S, each drawn
    between half and all of it (jitter, so that clients a restart failed together do not come back
    together)."""
    draw = (rng or random).uniform
    return [draw(0.5, 1.0) * min(RETRY_CAP_S, RETRY_BASE_S * 2**i) for i in range(max(0, retries))]


def retryable(exc: grpc.RpcError, produced: bool) -> bool:
    """UNAVAILABLE before anything came back: nothing was lost, trying again may reach a server."""
    return not produced and exc.code() == grpc.StatusCode.UNAVAILABLE


def _deadline(timeout_s: float | None) -> float | None:
    return None if timeout_s is None else time.monotonic() + timeout_s


def _left(deadline: float | None, after_s: float = 0.0) -> float | None:
    """Seconds left of a call's deadline after waiting `after_s` (None: no deadline)."""
    return None if deadline is None else deadline - time.monotonic() - after_s


def _may_retry(exc: grpc.RpcError, produced: bool, delay: float | None, deadline: float | None) -> bool:
    left = _left(deadline, delay or 0.0)
    return delay is not None and retryable(exc, produced) and (left is None or left > 0)


def auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...] | None:
    """The call metadata that carries an API key (the key given, else
    $PRISM_API_KEY); None when there is none."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
    return (("authorization", f"Bearer {key}"),) if key else None


class PrismClient:
    """Blocking client. Use it as a context manager, or call close(), so its
    channel is released.

    Args:
        target: the gateway's gRPC address, host:port.
        timeout_s: each call's deadline (a streamed generation's whole stream included); None: none.
        tls_ca: PEM file of the CA that verifies the gateway (turns TLS on; see the module's docstring).
        tls_cert: PEM file of a client certificate, for a gateway that requires one.
        tls_key: the private key of tls_cert. A file that cannot be read raises TlsConfigError (a
            ValueError) here.
        api_key: sent with every call (default $PRISM_API_KEY).
        retries: how many more times a call that failed UNAVAILABLE before anything came back is tried
            (0: never), within its deadline.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        tls_ca: PemPath | None = None,
        tls_cert: PemPath | None = None,
        tls_key: PemPath | None = None,
        api_key: str | None = None,
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.target = target
        self.timeout_s = timeout_s
        self.retries = retries
        self._metadata = auth_metadata(api_key)
        credentials = tls_credentials(tls_ca, tls_cert, tls_key)
        self._channel = (
            grpc.insecure_channel(target) if credentials is None else grpc.secure_channel(target, credentials)
        )
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> PrismClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def list_models(self) -> list[ModelInfo]:
        deadline = _deadline(self.timeout_s)
        for delay in (*retry_delays(self.retries), None):
            try:
                return _model_infos(
                    self._stub.ListModels(
                        gateway_pb2.ListModelsRequest(), timeout=_left(deadline), metadata=self._metadata
                    )
                )
            except grpc.RpcError as exc:
                if not _may_retry(exc, False, delay, deadline):
                    raise error_from_rpc(exc) from exc
            time.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def generate(self, model: str, prompt: str | None = None, **options: Unpack[GenerateOptions]) -> Completion:
        request = build_generate_request(model, prompt, **options)
        return completion_from_chunks(self._stream(request), request.request_id)

    def generate_stream(
        self, model: str, prompt: str | None = None, **options: Unpack[GenerateOptions]
    ) -> Iterator[CompletionChunk]:
        """Streams the completion. Closing the iterator before its end (close(),
        leaving a for loop and dropping it) cancels the call."""
        # Built here, not in the generator, so bad arguments raise at the call.
        request = build_generate_request(model, prompt, **options)
        return self._stream(request)

    def _stream(self, request: generate_pb2.GenerateRequest) -> Iterator[CompletionChunk]:
        request_id = request.request_id or None
        deadline = _deadline(self.timeout_s)
        for delay in (*retry_delays(self.retries), None):
            call = self._stub.Generate(request, timeout=_left(deadline), metadata=self._metadata)
            produced = False
            try:
                for response in call:
                    produced = True
                    request_id = request_id or response.request_id or None
                    yield chunk_from_response(response)
                return
            except grpc.RpcError as exc:
                if not _may_retry(exc, produced, delay, deadline):
                    raise error_from_rpc(exc, request_id) from exc
            finally:
                # Ends the RPC when the caller stops early; a no-op once it finished.
                call.cancel()
            time.sleep(delay)


class AsyncPrismClient:
    """The asyncio twin of PrismClient. `generate_stream` returns an async
    iterator; `aclose()` it (or use contextlib.aclosing) to cancel early.

    Args:
        target: the gateway's gRPC address, host:port.
        timeout_s: each call's deadline (a streamed generation's whole stream included); None: none.
        tls_ca: PEM file of the CA that verifies the gateway (turns TLS on).
        tls_cert: PEM file of a client certificate, for a gateway that requires one.
        tls_key: the private key of tls_cert.
        api_key: sent with every call (default $PRISM_API_KEY).
        retries: how many more times a call that failed UNAVAILABLE before anything came back is tried
            (0: never), within its deadline.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        tls_ca: PemPath | None = None,
        tls_cert: PemPath | None = None,
        tls_key: PemPath | None = None,
        api_key: str | None = None,
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.target = target
        self.timeout_s = timeout_s
        self.retries = retries
        self._metadata = auth_metadata(api_key)
        credentials = tls_credentials(tls_ca, tls_cert, tls_key)
        self._channel = (
            grpc.aio.insecure_channel(target) if credentials is None else grpc.aio.secure_channel(target, credentials)
        )
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncPrismClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def list_models(self) -> list[ModelInfo]:
        deadline = _deadline(self.timeout_s)
        for delay in (*retry_delays(self.retries), None):
            try:
                return _model_infos(
                    await self._stub.ListModels(
                        gateway_pb2.ListModelsRequest(), timeout=_left(deadline), metadata=self._metadata
                    )
                )
            except grpc.RpcError as exc:
                if not _may_retry(exc, False, delay, deadline):
                    raise error_from_rpc(exc) from exc
            await asyncio.sleep(delay)
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def generate(self, model: str, prompt: str | None = None, **options: Unpack[GenerateOptions]) -> Completion:
        request = build_generate_request(model, prompt, **options)
        chunks = [chunk async for chunk in self._stream(request)]
        return completion_from_chunks(chunks, request.request_id)

    def generate_stream(
        self, model: str, prompt: str | None = None, **options: Unpack[GenerateOptions]
    ) -> AsyncIterator[CompletionChunk]:
        # A plain method returning the async generator, so bad arguments raise
        # at the call rather than at the first `async for` step.
        request = build_generate_request(model, prompt, **options)
        return self._stream(request)

    async def _stream(self, request: generate_pb2.GenerateRequest) -> AsyncIterator[CompletionChunk]:
        request_id = request.request_id or None
        deadline = _deadline(self.timeout_s)
        for delay in (*retry_delays(self.retries), None):
            call = self._stub.Generate(request, timeout=_left(deadline), metadata=self._metadata)
            produced = False
            try:
                async for response in call:
                    produced = True
                    request_id = request_id or response.request_id or None
                    yield chunk_from_response(response)
                return
            except grpc.RpcError as exc:
                if not _may_retry(exc, produced, delay, deadline):
                    raise error_from_rpc(exc, request_id) from exc
            finally:
                # Synchronous on purpose: this may run while the generator is being
                # finalized, where awaiting is not allowed.
                call.cancel()
            await asyncio.sleep(delay)
