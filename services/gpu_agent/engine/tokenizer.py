"""A model's tokenizer: tokenizer.json through the `tokenizers` library, the
special tokens and chat template from tokenizer_config.json.

A model directory without tokenizer.json (a dummy model made from
config.json alone) gets a byte tokenizer: token id b is byte b, so any text
still round-trips and the engine can run end to end."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from services.gpu_agent.engine.chat_template import ChatTemplate

log = logging.getLogger(__name__)


def _byte_to_unicode() -> dict[int, str]:
    # The byte-level BPE alphabet: printable bytes stand for themselves, the
    # rest are shifted to code points from 256 on.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


def byte_tokenizer() -> tokenizers.Tokenizer:
    vocab = {char: byte for byte, char in _byte_to_unicode().items()}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _token_text(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens as strings or as AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _chat_template_source(model_dir: Path, tokenizer_config: dict[str, Any]) -> str | None:
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates; the default one is for chat
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    if isinstance(template, str) and template:
        return template
    jinja_file = model_dir / "chat_template.jinja"  # newer checkpoints keep it in its own file
    if jinja_file.exists():
        return jinja_file.read_text()
    return None


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        tokenizer_file = model_dir / "tokenizer.json"
        if tokenizer_file.exists():
            self._tok = tokenizers.Tokenizer.from_file(str(tokenizer_file))
            self.is_byte_fallback = False
        else:
            log.warning("%s has no tokenizer.json; using a byte tokenizer", model_dir)
            self._tok = byte_tokenizer()
            self.is_byte_fallback = True
        config_file = model_dir / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(config_file.read_text()) if config_file.exists() else {}
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.chat_template = ChatTemplate(_chat_template_source(model_dir, config),
                                          bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self._tok.token_to_id(self.eos_token) if self.eos_token else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """add_special_tokens lets tokenizer.json's post-processor add BOS
        (Llama 3 does); rendered chat already has its special tokens."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.chat_template.render(messages, add_generation_prompt)

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)
