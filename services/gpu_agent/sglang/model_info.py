"""What the agent needs to know of a model SGLang serves, read from its
Hugging Face folder without loading it: the KV cache's bytes per token (for
admission and the memory coordinator), the context length and the size of
the weights. Unlike the built-in engine's config reader this accepts any
decoder architecture: SGLang runs far more of them, and only the attention
geometry matters here.

Read as SGLang 0.5.15 reads the same config.json (configs/model_config.py,
utils/hf_transformers/common.py): the dtype under "dtype" (transformers 5)
or "torch_dtype", float32 when absent; --dtype auto runs a float32
checkpoint in float16 (bfloat16 for Gemma), and the KV cache has the
model's dtype (--kv-cache-dtype auto). The context length is the first of
max_sequence_length, seq_length, max_seq_len, model_max_length,
max_position_embeddings, times the rope scaling factor unless the rope
parameters carry original_max_position_embeddings (which transformers 5
fills in for yarn and longrope) or are llama3's; 2048 if none is given.
MLA models (DeepSeek's kv_lora_rank) keep one latent buffer per layer, not
K and V heads: they are refused rather than mis-sized."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from services.common.model_size import estimate_weight_bytes

# dtype names in config.json and SGLang's --dtype -> bytes per element.
_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "half": 2, "float32": 4, "float": 4, "float8_e4m3fn": 1, "float8_e5m2": 1}
_CONTEXT_LENGTH_KEYS = (
    "max_sequence_length",
    "seq_length",
    "max_seq_len",
    "model_max_length",
    "max_position_embeddings",
)
_ROPE_TYPES_WITH_ORIGINAL = ("llama3", "yarn", "longrope")  # factor not applied (see above)
DEFAULT_CONTEXT = 2048
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


class ModelInfoError(ValueError):
    """The model folder does not describe a model the driver can size."""


@dataclass(frozen=True)
class ModelInfo:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int
    max_context: int
    weight_bytes: int

    @property
    def kv_bytes_per_token(self) -> int:
        """One token's keys and values over all layers (and all TP ranks together)."""
        return self.kv_bytes_per_token_over(1)

    def kv_bytes_per_token_over(self, tp_size: int) -> int:
        """The same with tp_size ranks: SGLang gives each rank
        max(1, KV heads // tp_size) heads, replicating them when there are
        fewer heads than ranks (configs/model_config.py get_num_kv_heads)."""
        heads = tp_size * max(1, self.num_kv_heads // tp_size)
        return 2 * self.num_layers * heads * self.head_dim * self.dtype_bytes


def read_model_info(model_dir: str | Path, dtype: str = "auto", load_format: str = "auto") -> ModelInfo:
    """The geometry from config.json; the weights' size from the folder's weight files, or, for dummy
    weights (which SGLang makes up in the run dtype, whatever files lie there) or a folder without any,
    from the parameter count (services/common/model_size.py): counting 0 bytes, the agent's memory
    coordinator would switch such a model on anywhere."""
    folder = Path(model_dir)
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelInfoError(f"{path} not found (the SGLang driver needs a local model folder)") from None
    except json.JSONDecodeError as exc:
        raise ModelInfoError(f"{path} is not valid JSON: {exc}") from None
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw  # multimodal wrappers
    try:
        layers = int(text["num_hidden_layers"])
        heads = int(text["num_attention_heads"])
        kv_heads = int(text.get("num_key_value_heads") or heads)
        head_dim = int(text.get("head_dim") or int(text["hidden_size"]) // heads)
        max_context = context_length(text)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelInfoError(f"{path} lacks the attention geometry ({exc})") from None
    if text.get("kv_lora_rank"):
        raise ModelInfoError(
            f"{path}: an MLA model (kv_lora_rank); the SGLang driver sizes separate K and V heads only"
        )
    if min(layers, heads, kv_heads, head_dim) < 1:
        raise ModelInfoError(f"{path}: layers, heads, KV heads and head_dim must be positive")
    name = runtime_dtype(raw, text) if dtype == "auto" else dtype
    if name not in _DTYPE_BYTES:
        raise ModelInfoError(f"{path}: unknown dtype {name!r}")
    weights = sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    if load_format == "dummy" or not weights:
        weights = estimate_weight_bytes(str(folder), name)
    return ModelInfo(layers, kv_heads, head_dim, _DTYPE_BYTES[name], max_context, weights)


def runtime_dtype(raw: dict, text: dict) -> str:
    """The dtype SGLang runs a checkpoint in under --dtype auto."""
    name = str(text.get("dtype") or text.get("torch_dtype") or raw.get("dtype") or raw.get("torch_dtype") or "float32")
    if name in ("float32", "float"):
        return (
            "bfloat16" if str(text.get("model_type") or raw.get("model_type") or "").startswith("gemma") else "float16"
        )
    return name


def context_length(text: dict) -> int:
    rope = text.get("rope_scaling") or text.get("rope_parameters")
    factor = 1.0
    if (
        isinstance(rope, dict)
        and "original_max_position_embeddings" not in rope
        and (rope.get("rope_type") or rope.get("type")) not in _ROPE_TYPES_WITH_ORIGINAL
    ):
        factor = float(rope.get("factor", 1))
    for key in _CONTEXT_LENGTH_KEYS:
        if text.get(key) is not None:
            return int(factor * int(text[key]))
    return DEFAULT_CONTEXT
