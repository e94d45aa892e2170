"""Tiny GGUF files the tests write themselves from the project's tiny Hugging Face models
(prism/tiny_models.py), the way llama.cpp's converter writes a checkpoint: its metadata keys,
blk.N.* tensor names, Q and K rows reordered for llama.cpp's rotary layout, tensors in the asked
type. Written with the `gguf` package's own writer and quantizer."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

_TO_GGUF = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf: str) -> str:
    stem, kind = hf.rsplit(".", 1)
    if stem in _TO_GGUF:
        return f"{_TO_GGUF[stem]}.{kind}"
    _, _, layer, rest = stem.split(".", 3)
    return f"blk.{layer}.{_LAYER_TO_GGUF[rest]}.{kind}"


def permute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's order for Q/K rows: within each head, the checkpoint's row i and
    row i + head_dim/2 become neighbours (2i, 2i+1)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(
    model_dir: Path,
    out: Path,
    qtype: str = "F32",
    architecture: str | None = None,
    tensor_types: dict[str, str] | None = None,
) -> Path:
    """model_dir's tiny model as a GGUF file: 2-D weights in `qtype` (norms stay F32, as llama.cpp
    keeps them), or per tensor as tensor_types names it. architecture: what the file claims
    (default: the model's own)."""
    config = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    arch = config["model_type"]
    writer = gguf.GGUFWriter(str(out), architecture or arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    specials = {a["content"]: a["id"] for a in tok["added_tokens"]}
    vocab = {**tok["model"]["vocab"], **specials}
    tokens = sorted(vocab, key=vocab.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in specials else 1 for t in tokens])
    writer.add_token_merges([" ".join(m) for m in tok["model"]["merges"]])
    if tok_config.get("bos_token"):
        writer.add_bos_token_id(vocab[tok_config["bos_token"]])
    # The config's ends of sequence and the tokenizer's (the chat's end of turn): two at most, as
    # a GGUF file's eos and eot.
    config_eos = config["eos_token_id"] if isinstance(config["eos_token_id"], list) else [config["eos_token_id"]]
    ends = list(dict.fromkeys([*config_eos, vocab[tok_config["eos_token"]]]))
    assert len(ends) <= 2, ends
    writer.add_eos_token_id(ends[0])
    if len(ends) > 1:
        writer.add_eot_token_id(ends[1])
    writer.add_add_bos_token(bool(tok.get("post_processor")))  # the Llama's prepends BOS, the Qwen2's not
    writer.add_chat_template(tok_config["chat_template"])
    for name, weight in load_file(str(model_dir / "model.safetensors")).items():
        weight = weight.astype(np.float32)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            weight = permute_rotary_rows(weight, heads)
        kind = (tensor_types or {}).get(name) or (qtype if weight.ndim == 2 else "F32")
        target = gguf.GGMLQuantizationType[kind]
        if kind == "F32":
            writer.add_tensor(gguf_name(name), weight)
        elif kind == "F16":
            writer.add_tensor(gguf_name(name), weight.astype(np.float16))
        else:
            # The quantized bytes' shape, from which the writer works out the tensor's (as llama.cpp's converter).
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(weight, target), raw_dtype=target)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
