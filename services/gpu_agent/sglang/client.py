"""SGLang's native HTTP API, as the driver uses it, and its streaming format
(read from SGLang 0.5.15: python/sglang/srt/entrypoints/http_server.py and
managers/tokenizer_manager.py).

POST /generate with "stream": true answers text/event-stream: one
`data: {json}` event per step, then `data: [DONE]`. Each event is
{"text", "output_ids", "meta_info": {"id", "finish_reason", "prompt_tokens",
"completion_tokens", "cached_tokens", "reasoning_tokens", "weight_version",
...}}; with --incremental-streaming-output "text" and "output_ids" hold only
what is new (chunks queued together are concatenated), otherwise everything
so far (ChunkDecoder handles both). finish_reason is null while running,
then {"type": "stop", "matched": ...}, {"type": "length", "length": n} or
{"type": "abort", "message", "status_code", "err_type"}; a request aborted
while still waiting gets {"type": "abort", "message"} and no prompt_tokens.
A request SGLang refuses (a ValueError in its tokenizer manager: a prompt
over the context, bad sampling parameters) is refused inside the stream, as
`data: {"error": {"message", "type": "invalid_request_error", "code": 400,
"retryable": false}}` then [DONE]; only a body that fails FastAPI's
validation is an HTTP 400 ({"object": "error", "message", "type", "code"}).

POST /abort_request {"rid": ...} (or {"abort_all": true}) aborts every
request whose id starts with rid, and answers 200 with no body; after a
stream closes SGLang aborts its request too, two seconds later.
POST /release_memory_occupation and /resume_memory_occupation take
{"tags": [...]} (none: every region) and answer 200 null, or 400 {"error":
{"message"}}; the release must find the server idle (driver.py).
GET /v1/loads: the schedulers' request counts. GET /health answers 503 while
the server starts, then 200 after a one-token generation. GET /metrics with
--enable-metrics."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx

from services.gpu_agent.engine.errors import EngineError, InvalidRequestError
from services.gpu_agent.engine.request import GenerationOutput

DONE = object()  # the [DONE] event


class SGLangHTTPError(EngineError):
    """SGLang answered a call with an error status."""

    def __init__(self, path: str, status: int, message: str):
        super().__init__(f"SGLang {path} answered {status}: {message}")
        self.path, self.status, self.message = path, status, message


class StreamFormatError(EngineError):
    """An event in a /generate stream that is not SGLang's format."""


def parse_sse_line(line: str) -> dict[str, Any] | object | None:
    """One line of the event stream: its JSON object, DONE, or None for lines
    that carry no event (blank separators, comments, other fields)."""
    line = line.rstrip("\r\n")
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return DONE
    try:
        event = json.loads(data)
    except json.JSONDecodeError as exc:
        raise StreamFormatError(f"an SGLang stream event is not JSON ({exc}): {data[:200]!r}") from None
    if not isinstance(event, dict):
        raise StreamFormatError(f"an SGLang stream event is not an object: {data[:200]!r}")
    return event


def error_message(body: Any) -> str:
    """The message of an SGLang error body ({"error": {"message"}}, or
    FastAPI's {"detail"}), else the body itself."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        if body.get("detail"):
            return str(body["detail"])
        if body.get("message"):
            return str(body["message"])
    return str(body)[:2000]


def engine_error(message: str, status: int | None = None, err_type: str | None = None) -> EngineError:
    """Our error for SGLang's: the request's fault (HTTP 400, or SGLang's
    BadRequestError type) is InvalidRequestError, anything else the engine's."""
    text = f"SGLang: {message}"
    if status == 400 or (err_type or "").lower() in ("badrequesterror", "invalid_request_error"):
        return InvalidRequestError(text)
    return EngineError(text)


class ChunkDecoder:
    """Turns one request's stream events into GenerationOutputs (each with
    only what is new), and its errors and aborts into engine errors.

    Stop strings: SGLang 0.5.15 trims a matched stop string only from the
    last chunk's detokenization window (managers/detokenizer_manager.py,
    trim_matched_stop: the finished text is cut at the stop string and only
    what lies past what was already sent goes out), so the start of a stop
    string that spans tokens has already been streamed when it matches. The
    decoder therefore holds back text that could begin one of the request's
    stop strings until the next event shows it does not, and at a stop drops
    the matched string (or the start of it that SGLang had sent), so that, as
    with the built-in engine, no stop string is output.
    Token ids are passed on as SGLang sends them."""

    def __init__(self, incremental: bool, stop: Sequence[str] = ()):
        self.incremental = incremental
        self.stop = [s for s in stop if s]
        self.text = ""
        self.token_ids: list[int] = []
        self.completion_tokens = 0
        self._held = ""  # received, not yet output: could begin a stop string

    def _release(self, text: str, finish_reason: Any) -> str:
        """What of the text received so far can be output now."""
        text = self._held + text
        self._held = ""
        if finish_reason is not None:
            matched = finish_reason.get("matched") if isinstance(finish_reason, dict) else None
            if isinstance(matched, str) and matched:
                if matched in text:  # all of it arrived: cut it
                    text = text[: text.index(matched)]
                else:  # SGLang cut what it had not sent yet: drop the start of it that it had
                    text = text[
                        : len(text) - max((j for j in range(1, len(matched)) if text.endswith(matched[:j])), default=0)
                    ]
            return text
        held = max((j for s in self.stop for j in range(1, len(s)) if text.endswith(s[:j])), default=0)
        if held:
            text, self._held = text[:-held], text[-held:]
        return text

    def feed(self, event: dict[str, Any]) -> GenerationOutput | None:
        """The event's output, or None if it carries nothing new."""
        if "error" in event:
            message = error_message(event)
            err = event["error"] if isinstance(event["error"], dict) else {}
            # A stream error before any output is SGLang refusing the request.
            status = err.get("code") if isinstance(err.get("code"), int) else (400 if not self.token_ids else None)
            raise engine_error(message, status, err.get("type"))
        meta = event.get("meta_info")
        if not isinstance(meta, dict):
            raise StreamFormatError(f"an SGLang stream event has no meta_info: {str(event)[:200]}")
        text = event.get("text")
        ids = event.get("output_ids") or []
        if not isinstance(ids, list):
            raise StreamFormatError(f"output_ids is not a list: {ids!r}")
        if self.incremental:
            new_text, new_ids = text or "", list(ids)
            self.text += new_text
            self.token_ids += new_ids
        else:
            new_ids = list(ids[len(self.token_ids) :])
            self.token_ids = list(ids)
            if text is None:  # newer versions defer the text of intermediate chunks
                new_text = ""
            elif text.startswith(self.text):
                new_text, self.text = text[len(self.text) :], text
            else:  # detokenization revised earlier text: cannot happen with SGLang's surrogate handling
                raise StreamFormatError(f"cumulative text no longer extends what was streamed: {text[:200]!r}")
        finish = _finish_reason(meta.get("finish_reason"))
        new_text = self._release(new_text, meta.get("finish_reason"))
        self.completion_tokens = int(meta.get("completion_tokens", len(self.token_ids)))
        if not new_text and not new_ids and finish is None:
            return None
        return GenerationOutput(
            text=new_text,
            token_ids=new_ids,
            finish_reason=finish,
            prompt_tokens=int(meta.get("prompt_tokens", 0)),
            completion_tokens=self.completion_tokens,
        )


def _finish_reason(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        kind, reason = value, {}
    elif isinstance(value, dict):
        kind, reason = str(value.get("type")), value
    else:
        raise StreamFormatError(f"unknown finish_reason {value!r}")
    if kind in ("stop", "length"):
        return kind
    if kind == "abort":
        status = reason.get("status_code")
        raise engine_error(
            f"request aborted: {reason.get('message') or 'no reason given'}",
            int(status) if isinstance(status, int) else None,
            reason.get("err_type"),
        )
    raise StreamFormatError(f"unknown finish_reason type {kind!r}")


@dataclass
class GenerateStream:
    response: httpx.Response

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The stream's events up to [DONE] (or the end of the body)."""
        async for line in self.response.aiter_lines():
            event = parse_sse_line(line)
            if event is DONE:
                return
            if event is not None:
                yield event  # type: ignore[misc]


class SGLangClient:
    def __init__(
        self,
        base_url: str,
        control_timeout_s: float = 30.0,
        stream_read_timeout_s: float = 600.0,
        connect_timeout_s: float = 5.0,
    ):
        """control_timeout_s bounds every call but /generate streams, whose
        wait between two events is bounded by stream_read_timeout_s (a long
        prefill under load; a dead server is noticed by its exit instead)."""
        self.base_url = base_url
        self.control_timeout_s = control_timeout_s
        self._stream_timeout = httpx.Timeout(connect_timeout_s, read=stream_read_timeout_s)
        # No pool limit: every in-flight request holds a connection while it streams.
        self._http = httpx.AsyncClient(
            base_url=base_url,
            timeout=httpx.Timeout(control_timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def health(self, timeout_s: float = 5.0) -> bool:
        try:
            response = await self._http.get("/health", timeout=timeout_s)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    @asynccontextmanager
    async def generate(self, payload: dict[str, Any]) -> AsyncIterator[GenerateStream]:
        """The open /generate stream; the response closes when the block ends."""
        async with self._http.stream(
            "POST", "/generate", json={**payload, "stream": True}, timeout=self._stream_timeout
        ) as response:
            if response.status_code != 200:
                body = await response.aread()
                raise _refusal(response.status_code, body)
            yield GenerateStream(response)

    async def abort(self, rid: str | None = None, abort_all: bool = False, timeout_s: float = 5.0) -> None:
        """SGLang aborts every request whose id starts with `rid` (so ids
        must be prefix-free, see driver.sglang_rid); it answers 200 with an
        empty body, also for an id it no longer knows."""
        if not rid and not abort_all:
            raise ValueError("abort needs a request id or abort_all")
        body: dict[str, Any] = {"rid": rid or ""}
        if abort_all:
            body["abort_all"] = True
        await self._post("/abort_request", body, timeout_s)

    async def release_memory(self, tags: list[str] | None = None) -> None:
        await self._post("/release_memory_occupation", {"tags": tags} if tags else {})

    async def resume_memory(self, tags: list[str] | None = None) -> None:
        await self._post("/resume_memory_occupation", {"tags": tags} if tags else {})

    async def version(self, timeout_s: float | None = None) -> str:
        """SGLang's version, as /v1/loads reports it."""
        response = await self._http.get(
            "/v1/loads", params={"include": "core"}, timeout=timeout_s or self.control_timeout_s
        )
        if response.status_code != 200:
            raise SGLangHTTPError("/v1/loads", response.status_code, response.text[:500])
        version = response.json().get("version")
        if not isinstance(version, str):
            raise ValueError(f"/v1/loads has no version: {response.text[:200]}")
        return version

    async def loads(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """GET /v1/loads?include=core: one entry per data-parallel rank
        (num_running_reqs, num_waiting_reqs, num_used_tokens, ...) from the
        snapshot each scheduler publishes, also without --enable-metrics."""
        response = await self._http.get(
            "/v1/loads", params={"include": "core"}, timeout=timeout_s or self.control_timeout_s
        )
        if response.status_code != 200:
            raise SGLangHTTPError("/v1/loads", response.status_code, response.text[:500])
        body = response.json()
        loads = body.get("loads") if isinstance(body, dict) else None
        if not isinstance(loads, list):
            raise SGLangHTTPError("/v1/loads", response.status_code, f"no loads in {str(body)[:200]}")
        return [load for load in loads if isinstance(load, dict)]

    async def metrics_text(self, timeout_s: float | None = None) -> str:
        response = await self._http.get("/metrics", timeout=timeout_s or self.control_timeout_s)
        if response.status_code != 200:
            raise SGLangHTTPError("/metrics", response.status_code, response.text[:500])
        return response.text

    async def _post(self, path: str, body: dict[str, Any], timeout_s: float | None = None) -> Any:
        response = await self._http.post(path, json=body, timeout=timeout_s or self.control_timeout_s)
        parsed = _json_or_text(response.content)
        if response.status_code != 200:
            raise SGLangHTTPError(path, response.status_code, error_message(parsed))
        if isinstance(parsed, dict) and parsed.get("success") is False:  # newer versions answer 200 with success
            raise SGLangHTTPError(path, response.status_code, error_message(parsed))
        return parsed


def _json_or_text(content: bytes) -> Any:
    try:
        return json.loads(content) if content else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return content.decode("utf-8", "replace")


def _refusal(status: int, body: bytes) -> EngineError:
    return engine_error(error_message(_json_or_text(body)), status)
