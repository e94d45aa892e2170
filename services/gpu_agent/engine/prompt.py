"""A request's prompt as token ids: shared by the engine and by the agent,
which counts a request's tokens before admitting it (no torch needed here)."""

from __future__ import annotations

from services.gpu_agent.engine.chat_template import ChatTemplateError
from services.gpu_agent.engine.errors import InvalidRequestError
from services.gpu_agent.engine.request import GenerationRequest
from services.gpu_agent.engine.tokenizer import Tokenizer


def prompt_token_ids(tokenizer: Tokenizer, req: GenerationRequest) -> list[int]:
    """The request's prompt, or its chat rendered with the template, as token ids."""
    if req.messages is not None:
        if not req.messages:
            raise InvalidRequestError("messages is empty")
        for m in req.messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidRequestError(f"each message needs a string role and content, got {m!r}")
        try:
            return tokenizer.encode_chat(req.messages, req.add_generation_prompt)
        except ChatTemplateError as exc:
            raise InvalidRequestError(f"cannot render the chat: {exc}") from None
    if not req.prompt:
        raise InvalidRequestError("the prompt is empty (give a prompt or messages)")
    return tokenizer.encode(req.prompt)
