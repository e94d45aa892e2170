"""What the agent needs to know of a model SGLang serves, read from its
Hugging Face folder without loading it: the KV cache's bytes per token (for
admission and the memory coordinator), the context length and the size of
the weights. Unlike the built-in engine's config reader this accepts any
decoder architecture: SGLang runs far more of them, and only the attention
geometry matters here."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

# torch_dtype names in config.json -> bytes per element.
_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "half": 2, "float32": 4, "float": 4, "float8_e4m3fn": 1,
                "float8_e5m2": 1}
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
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes


def read_model_info(model_dir: str | Path, dtype: str = "auto") -> ModelInfo:
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
        max_context = int(text.get("max_position_embeddings") or raw.get("max_position_embeddings") or 0)
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelInfoError(f"{path} lacks the attention geometry ({exc})") from None
    if min(layers, heads, kv_heads, head_dim) < 1:
        raise ModelInfoError(f"{path}: layers, heads, KV heads and head_dim must be positive")
    name = (raw.get("torch_dtype") or text.get("torch_dtype") or "bfloat16") if dtype == "auto" else dtype
    if name not in _DTYPE_BYTES:
        raise ModelInfoError(f"{path}: unknown dtype {name!r}")
    weights = sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    return ModelInfo(layers, kv_heads, head_dim, _DTYPE_BYTES[name], max_context, weights)
