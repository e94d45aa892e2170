"""The tiny model generator: Hugging Face layout, determinism, a tokenizer
that covers any text, and the default models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tokenizers import Tokenizer

from prism.tiny_models import DEFAULT_TINY_MODELS, ensure_default_models, write_tiny_model

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: write_tiny_model(root / arch, arch=arch) for arch in ("llama", "qwen2")}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_layout_and_tensor_names(tiny, arch):
    path = tiny[arch]
    assert all((path / f).exists() for f in FILES)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == arch
    assert config["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]]
    h, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    assert (h, layers, config["num_attention_heads"], config["num_key_value_heads"]) == (64, 2, 4, 2)
    assert config["max_position_embeddings"] == 256
    tensors = load_file(str(path / "model.safetensors"))
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    expected = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,)}
    for n in range(layers):
        p = f"model.layers.{n}."
        expected |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (128, h),
            p + "mlp.up_proj.weight": (128, h),
            p + "mlp.down_proj.weight": (h, 128),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
        if arch == "qwen2":
            expected |= {
                p + "self_attn.q_proj.bias": (h,),
                p + "self_attn.k_proj.bias": (kv,),
                p + "self_attn.v_proj.bias": (kv,),
            }
    if arch == "llama":
        expected["lm_head.weight"] = (vocab, h)
    assert {k: tuple(t.shape) for k, t in tensors.items()} == expected
    assert config["tie_word_embeddings"] == (arch == "qwen2")
    assert (tensors["model.norm.weight"] == 1).all()
    std = float(tensors["model.layers.0.mlp.up_proj.weight"].std())
    assert 0.02 <= std <= 0.2  # scaled: neither degenerate nor exploding


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_same_seed_same_bytes_other_seed_other_weights(tiny, tmp_path, arch):
    again = write_tiny_model(tmp_path / "again", arch=arch)
    for f in FILES:
        assert (again / f).read_bytes() == (tiny[arch] / f).read_bytes(), f
    other = write_tiny_model(tmp_path / "other", arch=arch, seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny[arch] / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny[arch] / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tokenizer_covers_any_text(tiny, arch):
    tok = Tokenizer.from_file(str(tiny[arch] / "tokenizer.json"))
    config = json.loads((tiny[arch] / "config.json").read_text())
    assert tok.get_vocab_size() == config["vocab_size"]
    for text in ["Hello world", "Grüße, 日本語 and 🙂🚀!", "tabs\tand\nnewlines \x00\x7f", "ZZZ qqq xyzzy 0123456789"]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
        assert max(ids) < config["vocab_size"]
    common = "the people of the world"
    assert len(tok.encode(common, add_special_tokens=False).ids) <= len(common) // 2  # merges were learned


def test_special_tokens_and_chat_templates(tiny):
    llama = Tokenizer.from_file(str(tiny["llama"] / "tokenizer.json"))
    llama_cfg = json.loads((tiny["llama"] / "config.json").read_text())
    assert llama.encode("Hi").ids[0] == llama_cfg["bos_token_id"] == llama.token_to_id("<|begin_of_text|>")
    assert llama_cfg["eos_token_id"] == llama.token_to_id("<|eot_id|>")
    assert llama.encode("<|eot_id|>", add_special_tokens=False).ids == [llama_cfg["eos_token_id"]]
    qwen = Tokenizer.from_file(str(tiny["qwen2"] / "tokenizer.json"))
    qwen_cfg = json.loads((tiny["qwen2"] / "config.json").read_text())
    assert qwen.encode("Hi").ids == qwen.encode("Hi", add_special_tokens=False).ids  # no BOS
    assert qwen_cfg["eos_token_id"] == [qwen.token_to_id("<|im_end|>"), qwen.token_to_id("<|endoftext|>")]
    for arch in ("llama", "qwen2"):
        tc = json.loads((tiny[arch] / "tokenizer_config.json").read_text())
        assert "chat_template" in tc and tc["eos_token"]


def test_unknown_arch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown arch"):
        write_tiny_model(tmp_path / "x", arch="gpt2")


def test_ensure_default_models_writes_once(tmp_path):
    assert DEFAULT_TINY_MODELS == {"tiny-llama": "llama", "tiny-qwen2": "qwen2"}
    paths = ensure_default_models(tmp_path / "models")
    assert set(paths) == set(DEFAULT_TINY_MODELS)
    for name, path in paths.items():
        assert path == (tmp_path / "models" / name).resolve()
        assert json.loads((path / "config.json").read_text())["model_type"] == DEFAULT_TINY_MODELS[name]
    stamps = {name: (path / "model.safetensors").stat().st_mtime_ns for name, path in paths.items()}
    assert ensure_default_models(tmp_path / "models") == paths
    assert {name: (path / "model.safetensors").stat().st_mtime_ns for name, path in paths.items()} == stamps
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == sorted(DEFAULT_TINY_MODELS)  # no leftovers
    (paths["tiny-llama"] / "model.safetensors").unlink()  # an incomplete model is written again
    assert (ensure_default_models(tmp_path / "models")["tiny-llama"] / "model.safetensors").exists()
