"""Incremental detokenization for streaming.

Decoding token by token is wrong in two ways: a character can span several
byte-level tokens (decoding half of it gives U+FFFD), and some decoders
change a token's text depending on its neighbours (SentencePiece's leading
space). So each step decodes a small window that starts a few tokens back and
emits only what the window added beyond its already-emitted prefix, holding
text back while it ends in an incomplete character."""

from __future__ import annotations

from services.gpu_agent.engine.tokenizer import Tokenizer

_CONTEXT_TOKENS = 5  # prompt tokens decoded as left context, never emitted
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0  # the window decoded each step starts here
        self.read_offset = len(self.ids)  # text of ids before this has been emitted

    def _decode(self, start: int, end: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[start:end])

    def push(self, token_id: int) -> str:
        """Adds a token; returns the text that became final with it (maybe "")."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        full_text = self._decode(self.prefix_offset)
        if len(full_text) <= len(prefix_text) or full_text.endswith(_REPLACEMENT):
            return ""
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        return full_text[len(prefix_text) :]

    def flush(self) -> str:
        """At the end of a sequence: whatever is still held back, even an
        incomplete character (as U+FFFD, as a full decode would show it)."""
        prefix_text = self._decode(self.prefix_offset, self.read_offset)
        full_text = self._decode(self.prefix_offset)
        self.prefix_offset = self.read_offset = len(self.ids)
        return full_text[len(prefix_text) :]
