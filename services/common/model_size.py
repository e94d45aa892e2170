"""A decoder-only transformer's weight size from its config.json, before any
agent has loaded it: what the placement policies count a model's weights as
until an agent reports the real number."""

from __future__ import annotations

import json
from pathlib import Path

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def estimate_weight_bytes(model_path: str, dtype: str = "auto") -> int:
    """Parameter count times element size for a Llama/Qwen2-style model
    (embeddings, attention with grouped K/V, gated MLP, norms, an untied
    head); 0 when the config cannot be read (remote path, other family)."""
    try:
        cfg = json.loads((Path(model_path) / "config.json").read_text())
        hidden = int(cfg["hidden_size"])
        layers = int(cfg["num_hidden_layers"])
        heads = int(cfg["num_attention_heads"])
        kv_heads = int(cfg.get("num_key_value_heads", heads))
        head_dim = int(cfg.get("head_dim", hidden // heads))
        inter = int(cfg["intermediate_size"])
        vocab = int(cfg["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    mlp = 3 * hidden * inter
    per_layer = attention + mlp + 2 * hidden
    embeddings = vocab * hidden * (1 if cfg.get("tie_word_embeddings", False) else 2)
    params = layers * per_layer + embeddings + hidden
    element = DTYPE_BYTES.get(dtype if dtype != "auto" else str(cfg.get("torch_dtype", "bfloat16")), 2)
    return params * element
