"""A model in one GGUF file (llama.cpp's format): its config, tokenizer and chat
template from the file's metadata, its tensors dequantized to float32 under
Hugging Face names, so the rest of the engine serves it as it serves a
safetensors checkpoint.

The `gguf` package (llama.cpp's own reader) parses the file and dequantizes the
blocks; this module decides what the engine can serve and says clearly what it
cannot: another architecture, a quantization it does not take, a truncated file.
Served: the Llama and Qwen2 architectures; F32, F16, BF16, Q8_0, Q4_0 and Q4_1
tensors; byte-level BPE ("gpt2") tokenizers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.gpu_agent.engine.model_config import ModelConfig, ModelConfigError, RopeScaling

SUFFIX = ".gguf"
ROTARY_PERMUTED = ("q_proj.weight", "k_proj.weight", "q_proj.bias", "k_proj.bias")  # a Llama file's, see below
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")
TOKENIZER_MODELS = ("gpt2",)  # byte-level BPE; SentencePiece ("llama") files are not served yet

# How a byte-level vocabulary's text is split before the merges, by the file's tokenizer.ggml.pre:
# the split its merges were learned with (each model's own tokenizer.json says the same).
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizer:
    split: str  # the regex the text is split by
    single_digits: bool = False  # digits split one by one first (SmolLM's tokenizer)


PRE_TOKENIZERS = {
    "default": PreTokenizer(_GPT2_SPLIT),
    "gpt2": PreTokenizer(_GPT2_SPLIT),
    "smollm": PreTokenizer(_GPT2_SPLIT, single_digits=True),
    "llama-bpe": PreTokenizer(_LLAMA3_SPLIT),
    "llama3": PreTokenizer(_LLAMA3_SPLIT),
    "qwen2": PreTokenizer(_QWEN2_SPLIT),
}

# GGUF tensor names (blk.N.*) to the Hugging Face names the engine's model has.
_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


class GGUFError(ModelConfigError):
    """A GGUF file the engine cannot serve; the message names what is unsupported or broken."""


@dataclass(frozen=True)
class GGUFTokenizerSpec:
    """What the file says of its tokenizer."""

    tokens: tuple[str, ...]
    token_types: tuple[int, ...]  # llama.cpp's: 1 normal, 3 control (special), 4 user-defined, ...
    merges: tuple[str, ...]
    pre: PreTokenizer
    bos_token_id: int | None
    eos_token_id: int | None
    add_bos_token: bool
    chat_template: str | None


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == SUFFIX


class GGUFModelFile:
    """One open GGUF file. Reading the metadata maps the file; tensors are dequantized one at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            import gguf
        except ImportError:
            raise GGUFError(f"{self.path}: reading GGUF files needs the gguf package (pip install gguf)") from None
        if not self.path.is_file():
            raise GGUFError(f"{self.path}: no such GGUF file")
        try:
            self._reader = gguf.GGUFReader(str(self.path))
        except Exception as exc:  # the reader raises ValueError, struct errors, ... on a cut or foreign file
            raise GGUFError(
                f"{self.path}: not a readable GGUF file (truncated or corrupt?): {type(exc).__name__}: {exc}"
            ) from None
        self.architecture = self._string("general.architecture")
        if self.architecture not in ARCHITECTURES:
            raise GGUFError(
                f"{self.path}: architecture {self.architecture!r} is not supported "
                f"(supported: {', '.join(ARCHITECTURES)})"
            )
        self._check_tensor_types()

    # ---- metadata -------------------------------------------------------------------------

    def _value(self, key: str, default: Any = None) -> Any:
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def _string(self, key: str) -> str:
        value = self._value(key)
        if not isinstance(value, str):
            raise GGUFError(f"{self.path}: metadata {key!r} is missing")
        return value

    def _arch(self, key: str, default: Any = None) -> Any:
        value = self._value(f"{self.architecture}.{key}", default)
        if value is None:
            raise GGUFError(f"{self.path}: metadata {self.architecture}.{key} is missing")
        return value

    def _check_tensor_types(self) -> None:
        unsupported = sorted({t.tensor_type.name for t in self._reader.tensors} - set(TENSOR_TYPES))
        if unsupported:
            raise GGUFError(
                f"{self.path}: tensor types {', '.join(unsupported)} are not supported "
                f"(supported: {', '.join(TENSOR_TYPES)})"
            )
        names = {t.name for t in self._reader.tensors}
        if "rope_freqs.weight" in names:  # Llama 3.1's rope scaling, stored as factors, not as metadata
            raise GGUFError(f"{self.path}: rope frequency factors (rope_freqs.weight) are not supported")

    def model_config(self) -> ModelConfig:
        hidden = int(self._arch("embedding_length"))
        heads = int(self._arch("attention.head_count"))
        kv_heads = int(self._arch("attention.head_count_kv", heads))
        head_dim = int(self._arch("attention.key_length", hidden // heads))
        tokens = self._value("tokenizer.ggml.tokens") or []
        scaling, scaling_type = None, self._value(f"{self.architecture}.rope.scaling.type")
        if scaling_type == "linear":
            scaling = RopeScaling("linear", float(self._arch("rope.scaling.factor")))
        elif scaling_type not in (None, "none"):
            raise GGUFError(f"{self.path}: rope scaling {scaling_type!r} is not supported")
        names = {t.name for t in self._reader.tensors}
        model_type = self.architecture
        # The ids that end a reply: end of sequence, and end of turn / message where the file names them.
        eos = tuple(
            dict.fromkeys(
                int(v)
                for v in (self._value(f"tokenizer.ggml.{kind}_token_id") for kind in ("eos", "eot", "eom"))
                if v is not None
            )
        )
        try:
            return ModelConfig(
                architecture=ARCHITECTURES[model_type],
                model_type=model_type,
                hidden_size=hidden,
                intermediate_size=int(self._arch("feed_forward_length")),
                num_hidden_layers=int(self._arch("block_count")),
                num_attention_heads=heads,
                num_key_value_heads=kv_heads,
                head_dim=head_dim,
                rms_norm_eps=float(self._arch("attention.layer_norm_rms_epsilon", 1e-6)),
                rope_theta=float(self._arch("rope.freq_base", 10000.0)),
                rope_scaling=scaling,
                vocab_size=int(self._arch("vocab_size", len(tokens))),
                max_position_embeddings=int(self._arch("context_length", 2048)),
                tie_word_embeddings="output.weight" not in names,
                qkv_bias=model_type == "qwen2" or "blk.0.attn_q.bias" in names,
                o_bias="blk.0.attn_output.bias" in names,
                mlp_bias="blk.0.ffn_up.bias" in names,
                torch_dtype=None,
                bos_token_id=self._value("tokenizer.ggml.bos_token_id"),
                eos_token_ids=eos,
            )
        except (TypeError, ValueError) as exc:
            raise GGUFError(f"{self.path}: {exc}") from None

    def tokenizer_spec(self) -> GGUFTokenizerSpec:
        kind = self._value("tokenizer.ggml.model")
        if kind not in TOKENIZER_MODELS:
            raise GGUFError(
                f"{self.path}: tokenizer model {kind!r} is not supported (supported: "
                f"{', '.join(TOKENIZER_MODELS)}: byte-level BPE)"
            )
        pre_name = self._value("tokenizer.ggml.pre", "default")
        if pre_name not in PRE_TOKENIZERS:
            raise GGUFError(
                f"{self.path}: tokenizer pre-type {pre_name!r} is not supported "
                f"(supported: {', '.join(PRE_TOKENIZERS)})"
            )
        tokens = tuple(self._value("tokenizer.ggml.tokens") or ())
        if not tokens:
            raise GGUFError(f"{self.path}: metadata tokenizer.ggml.tokens is missing")
        types = tuple(self._value("tokenizer.ggml.token_type") or (1,) * len(tokens))
        return GGUFTokenizerSpec(
            tokens=tokens,
            token_types=types,
            merges=tuple(self._value("tokenizer.ggml.merges") or ()),
            pre=PRE_TOKENIZERS[pre_name],
            bos_token_id=self._value("tokenizer.ggml.bos_token_id"),
            eos_token_id=self._value("tokenizer.ggml.eos_token_id"),
            add_bos_token=bool(self._value("tokenizer.ggml.add_bos_token", False)),
            chat_template=self._value("tokenizer.chat_template"),
        )

    # ---- tensors --------------------------------------------------------------------------

    def tensors(self, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
        """(Hugging Face name, float32 tensor) per tensor of the file, in the file's order. A Llama
        file's Q and K rows are in llama.cpp's rotary order; they are put back in the checkpoint's."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        for t in self._reader.tensors:
            name = hf_name(t.name)
            if name is None:
                raise GGUFError(f"{self.path}: unexpected tensor {t.name!r}")
            try:
                values = np.asarray(dequantize(t.data, GGMLQuantizationType(t.tensor_type)), dtype=np.float32)
            except Exception as exc:
                raise GGUFError(
                    f"{self.path}: cannot read tensor {t.name!r} (truncated file?): {type(exc).__name__}: {exc}"
                ) from None
            # GGUF writes dimensions innermost first; the dequantized array is rows x columns already.
            values = values.reshape(tuple(int(d) for d in reversed(t.shape)))
            if config.model_type == "llama" and name.endswith(ROTARY_PERMUTED):
                heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
                values = unpermute_rotary_rows(values, heads)
            yield name, torch.from_numpy(values.copy())


def hf_name(gguf_name: str) -> str | None:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight; None for a name not known."""
    parts = gguf_name.split(".")
    if len(parts) == 2 and parts[0] in _TOP_LEVEL:
        return f"{_TOP_LEVEL[parts[0]]}.{parts[1]}"
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _PER_LAYER:
        return f"model.layers.{parts[1]}.{_PER_LAYER[parts[2]]}.{parts[3]}"
    return None


def unpermute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter reorders each head's Q/K rows from the checkpoint's rotary layout (the
    first half of the head's dimensions paired with the second) to interleaved pairs; this puts
    them back: within a head, row 2i goes to i and row 2i+1 to i + head_dim/2."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
