"""Request bodies of the OpenAI-compatible API, and their translation into
the GenerateRequest the agents take; and the response bodies, which only
document the API (the OpenAPI spec at /openapi.json says what each
operation answers, errors included).

Types are strict (no "0.5" for a number, no true for an integer) and
unknown fields are ignored, as OpenAI clients send many we do not use.
Text must be Unicode: JSON can escape half a surrogate pair alone
("\\ud800"), which no protobuf string (nor UTF-8) can carry.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

from prism_client.v1 import generate_pb2
from services.gateway.validation import CHAT_ROLES, INT32_MAX, INT64_MAX, INT64_MIN, MAX_TEMPERATURE

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

MaxTokens = Annotated[int, Field(ge=1, le=INT32_MAX)]
# The smallest positive float32. top_p travels as a protobuf float: a valid top_p below this would
# round to 0 there and be refused as outside (0, 1]; it becomes this instead (keeping only the most
# likely token, as the client's value would).
FLOAT32_TRUE_MIN = 2.0**-149


def _unicode(value: Any) -> Any:
    """A string with an unpaired surrogate is refused (400) here, where the
    field is known, instead of failing the request's translation to protobuf."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"must be valid Unicode: unpaired surrogate {value[exc.start]!r} at index {exc.start}"
            ) from None
    return value


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _GenerateBody(_Body):
    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, WithJsonSchema({"type": "integer", "enum": [1], "default": 1})] = 1  # only 1 is supported
    ignore_eos: bool = False  # an extension (as in vLLM), for benchmarks

    @field_validator("model", mode="before")
    @classmethod
    def _model_is_unicode(cls, value: Any) -> Any:
        return _unicode(value)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_is_text(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return _unicode(value)
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return [_unicode(s) for s in value]
        raise ValueError("stop must be a string or a list of strings")

    @field_validator("n", mode="after")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError(f"only n=1 is supported, got {value}")
        return value

    @property
    def include_usage_chunk(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def _sampling(self, max_tokens: int | None) -> generate_pb2.SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        sampling = generate_pb2.SamplingParams(stop=stop, ignore_eos=self.ignore_eos)
        if max_tokens is not None:
            sampling.max_tokens = max_tokens
        if self.temperature is not None:
            sampling.temperature = self.temperature
        if self.top_p is not None:
            sampling.top_p = max(self.top_p, FLOAT32_TRUE_MIN)
        if self.seed is not None:
            sampling.seed = self.seed
        return sampling


class CompletionRequest(_GenerateBody):
    prompt: Annotated[
        str,
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string", "minLength": 1},
                    {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1},
                ]
            }
        ),
    ]
    # null, like absent, means OpenAI's default
    max_tokens: MaxTokens | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
            value = value[0]
        if not isinstance(value, str):
            raise ValueError("prompt must be a string (or a list of one string)")
        if not value:
            raise ValueError("prompt must not be empty")
        return _unicode(value)

    def to_grpc(self, request_id: str) -> generate_pb2.GenerateRequest:
        max_tokens = self.max_tokens if self.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
        return generate_pb2.GenerateRequest(
            request_id=request_id, model=self.model, prompt=self.prompt, sampling=self._sampling(max_tokens)
        )


class ChatMessage(_Body):
    role: Literal[CHAT_ROLES]  # type: ignore[valid-type]
    content: Annotated[
        str,
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string"},
                    {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["type", "text"],
                            "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
                        },
                    },
                ]
            }
        ),
    ]

    @field_validator("content", mode="before")
    @classmethod
    def _text_content(cls, value: Any) -> Any:
        """A string, or OpenAI's list of {"type": "text", "text": ...} parts (joined by newlines)."""
        if isinstance(value, str):
            return _unicode(value)
        if isinstance(value, list):
            texts = []
            for part in value:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ValueError('content parts must be {"type": "text", "text": "..."}; only text is supported')
                texts.append(_unicode(part["text"]))
            return "\n".join(texts)
        raise ValueError("content must be a string or a list of text parts")


class ChatCompletionRequest(_GenerateBody):
    messages: list[ChatMessage] = Field(min_length=1)
    # Unset means the rest of the model's context (the engine's default).
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None  # OpenAI's newer name; wins over max_tokens

    def to_grpc(self, request_id: str) -> generate_pb2.GenerateRequest:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        chat = generate_pb2.ChatInput(
            messages=[generate_pb2.ChatMessage(role=m.role, content=m.content) for m in self.messages]
        )
        return generate_pb2.GenerateRequest(
            request_id=request_id, model=self.model, chat=chat, sampling=self._sampling(max_tokens)
        )


# ---- responses (documentation only: the routes build these bodies as dicts) -------------------------


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None
    request_id: str  # ours, beside OpenAI's four


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx of the API, as OpenAI's."""

    error: ErrorDetail


class PromptTokensDetails(BaseModel):
    cached_tokens: int  # prompt tokens whose KV came from the engine's prefix cache


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


FinishReason = Literal["stop", "length"] | None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None
    finish_reason: FinishReason


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatCompletionChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage


class ModelObject(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    available: bool  # ours: a live agent serves it
    max_context: int  # ours


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelObject]


class Health(BaseModel):
    status: str


# A streamed answer: one event per chunk (a text_completion or chat.completion.chunk object, or an
# error object when the generation fails after it began), then "[DONE]".
SSE_EVENTS = {"itemSchema": {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}}
