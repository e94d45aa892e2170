"""A model's tokenizer: tokenizer.json through the `tokenizers` library, the
special tokens and chat template from tokenizer_config.json; or all of it from
a GGUF file's metadata (Tokenizer.from_gguf).

A model directory without tokenizer.json (a dummy model made from
config.json alone) gets a byte tokenizer: token id b is byte b, so any text
still round-trips and the engine can run end to end."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from services.gpu_agent.engine.chat_template import ChatTemplate
from services.gpu_agent.engine.gguf_file import GGUFTokenizerSpec

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types: special tokens, and added ones matched whole

log = logging.getLogger(__name__)


def _merge_pair(merge: str) -> tuple[str, str]:
    """A GGUF merge, "left right", as the pair BPE takes."""
    left, space, right = merge.partition(" ")
    if not space:
        raise ValueError(f"a BPE merge is two tokens and a space between them, got {merge!r}")
    return left, right


def _byte_to_unicode() -> dict[int, str]:
    # The byte-level BPE alphabet: printable bytes stand for themselves, the
    # rest are shifted to code points from 256 on.
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
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


def gguf_tokenizer(spec: GGUFTokenizerSpec) -> tokenizers.Tokenizer:
    """A GGUF file's byte-level BPE as a `tokenizers` tokenizer: its vocabulary and merges, its
    pre-tokenizer's split, its control tokens kept whole as special tokens (user-defined ones whole
    as plain added tokens), BOS prepended where the file says so."""
    alphabet = _byte_to_unicode()
    spelled = set(alphabet.values())
    # A token written in raw text rather than in the byte alphabet is spelled in it, byte by byte.
    vocab = {
        token if set(token) <= spelled else "".join(alphabet[b] for b in token.encode()): index
        for index, token in enumerate(spec.tokens)
    }
    merges = [_merge_pair(m) for m in spec.merges]
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges))
    steps = [pre_tokenizers.Digits(individual_digits=True)] if spec.pre.single_digits else []
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            *steps,
            pre_tokenizers.Split(Regex(spec.pre.split), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    typed = list(zip(spec.tokens, spec.token_types))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, kind in typed if kind == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, kind in typed if kind == USER_DEFINED])
    if spec.add_bos_token and spec.bos_token_id is not None:
        bos = spec.tokens[spec.bos_token_id]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, spec.bos_token_id)]
        )
    return tok


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        tokenizer_file = model_dir / "tokenizer.json"
        if tokenizer_file.exists():
            tok = tokenizers.Tokenizer.from_file(str(tokenizer_file))
            byte_fallback = False
        else:
            log.warning("%s has no tokenizer.json; using a byte tokenizer", model_dir)
            tok = byte_tokenizer()
            byte_fallback = True
        config_file = model_dir / "tokenizer_config.json"
        config: dict[str, Any] = json.loads(config_file.read_text()) if config_file.exists() else {}
        self._setup(
            tok,
            _token_text(config.get("bos_token")),
            _token_text(config.get("eos_token")),
            _chat_template_source(model_dir, config),
            byte_fallback,
        )

    @classmethod
    def from_gguf(cls, spec: GGUFTokenizerSpec) -> Tokenizer:
        """The tokenizer and chat template a GGUF file's metadata holds (gguf_file.py)."""

        def text(token_id: int | None) -> str | None:
            return spec.tokens[token_id] if token_id is not None and 0 <= token_id < len(spec.tokens) else None

        self = cls.__new__(cls)
        self._setup(
            gguf_tokenizer(spec),
            text(spec.bos_token_id),
            text(spec.eos_token_id),
            spec.chat_template,
            byte_fallback=False,
        )
        return self

    def _setup(
        self,
        tok: tokenizers.Tokenizer,
        bos_token: str | None,
        eos_token: str | None,
        chat_template: str | None,
        byte_fallback: bool,
    ) -> None:
        self._tok = tok
        self.is_byte_fallback = byte_fallback
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.chat_template = ChatTemplate(chat_template, bos_token=bos_token or "", eos_token=eos_token or "")

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
