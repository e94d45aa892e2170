"""OpenAI response bodies and stream chunks, made from the agent's
GenerateResponse pieces: text_completion for /v1/completions and
chat.completion(.chunk) for /v1/chat/completions."""

from __future__ import annotations

import json
import time
from typing import Any

from prism_client.v1 import generate_pb2

FINISH_REASONS = {
    generate_pb2.FINISH_REASON_STOP: "stop",
    generate_pb2.FINISH_REASON_LENGTH: "length",
}


def finish_reason(piece: generate_pb2.GenerateResponse) -> str | None:
    return FINISH_REASONS.get(piece.finish_reason)


def usage_dict(usage: generate_pb2.Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_prompt_tokens},
    }


def sse_event(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


class OpenAIFormat:
    """Builds the bodies of one request; `chat` picks the chat shapes."""

    def __init__(self, request_id: str, model: str, chat: bool):
        self.request_id = request_id
        self.model = model
        self.chat = chat
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def response(self, text: str, finish: str | None, usage: generate_pb2.Usage) -> dict[str, Any]:
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
            body = self._envelope("chat.completion", [choice])
        else:
            body = self._envelope(
                "text_completion", [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]
            )
        body["usage"] = usage_dict(usage)
        return body

    def _chunk(self, text: str | None, finish: str | None, *, role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return self._envelope(
                "chat.completion.chunk", [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            )
        return self._envelope(
            "text_completion", [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]
        )

    def opening_chunks(self) -> list[dict[str, Any]]:
        """Chat streams open with the assistant's role, as OpenAI's do."""
        return [self._chunk("", None, role=True)] if self.chat else []

    def piece_chunks(self, piece: generate_pb2.GenerateResponse) -> list[dict[str, Any]]:
        """The chunks for one agent piece: its text (when any), then, on the
        last piece, the finish reason in a chunk of its own."""
        chunks = [self._chunk(piece.text, None)] if piece.text else []
        finish = finish_reason(piece)
        if finish is not None:
            chunks.append(self._chunk(None, finish))
        return chunks

    def usage_chunk(self, usage: generate_pb2.Usage) -> dict[str, Any]:
        """The final chunk of stream_options.include_usage: no choices, only usage."""
        chunk = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        chunk["usage"] = usage_dict(usage)
        return chunk
