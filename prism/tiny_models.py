"""Tiny random-weight models in Hugging Face format, made here instead of
downloaded: config.json, model.safetensors, tokenizer.json (a small
byte-level BPE trained on a generated corpus, so it encodes any text) and
tokenizer_config.json with a chat template. Deterministic for a given seed.

The weights are scaled so that logits are far from uniform: greedy outputs
differ from prompt to prompt, and near-ties between the top two tokens (which
would make float rounding decide the output) are rare."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

DEFAULT_TINY_MODELS: dict[str, str] = {"tiny-llama": "llama", "tiny-qwen2": "qwen2"}

VOCAB_SIZE = 512
WEIGHT_STD = 0.1

_SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

# Special tokens, first in the vocabulary (ids 0, 1, ...), in the style of each family.
_LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
_QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
_QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_WORDS = (
    "the a an of to and in is it that was for on are with as be at by this have from or one had not but what all "
    "were when we there can your which their said if do will each about how up out them then she many some so these "
    "would other into has more her two like him see time could no make than first been its who now people my made "
    "over did down only way find use may water long little very after words called just where most know get through "
    "back much before go good new write our used me man too any day same right look think also around another came "
    "come work three word must because does part even place well such here take why help put different away again "
    "off went old number great tell men say small every found still between name should home big give air line set "
    "own under read last never us left end along while might next sound below saw something thought both few those "
    "always show large often together asked house world going want school important until form food keep children "
    "model token engine serve request stream cluster memory cache layer attention prompt latency hello world "
    "café naïve résumé über straße façade 日本語 中文 한국어 Привет мир γειά σου 🙂 🚀 ✨ — … « » ¿ ¡"
).split()
_PUNCT = [".", ",", "!", "?", ";", ":", "\n", " -", "'s", "(", ")", '"']


def _corpus(seed: int = 1234, sentences: int = 3000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        text = " ".join(words)
        lines.append(text[0].upper() + text[1:] + rng.choice(_PUNCT))
    return lines


def train_tokenizer(specials: list[str], bos: str | None) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: any text encodes
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if bos is not None:  # like Llama 3: encoding a prompt adds BOS
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    return tok


def _config(arch: str, tok: Tokenizer) -> dict:
    vocab = tok.get_vocab_size()
    if arch == "llama":
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            **_SIZES,
            "head_dim": _SIZES["hidden_size"] // _SIZES["num_attention_heads"],
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "rope_scaling": None,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "vocab_size": vocab,
            "torch_dtype": "float32",
            "initializer_range": 0.02,
            "bos_token_id": tok.token_to_id("<|begin_of_text|>"),
            "eos_token_id": tok.token_to_id("<|eot_id|>"),
        }
    if arch == "qwen2":
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            **_SIZES,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": _SIZES["num_hidden_layers"],
            "tie_word_embeddings": True,
            "vocab_size": vocab,
            "torch_dtype": "float32",
            "initializer_range": 0.02,
            "bos_token_id": tok.token_to_id("<|endoftext|>"),
            "eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")],
        }
    raise ValueError(f"unknown arch {arch!r} (known: llama, qwen2)")


def _tokenizer_config(arch: str) -> dict:
    if arch == "llama":
        return {
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "model_max_length": _SIZES["max_position_embeddings"],
            "chat_template": _LLAMA_CHAT_TEMPLATE,
            "tokenizer_class": "PreTrainedTokenizerFast",
        }
    return {
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": _SIZES["max_position_embeddings"],
        "chat_template": _QWEN2_CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def random_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """HF-named tensors: normal(0, WEIGHT_STD) matrices and biases, unit norms."""
    g = torch.Generator().manual_seed(seed)
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    d = config.get("head_dim") or h // config["num_attention_heads"]
    q_out, kv_out = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    qkv_bias = config["model_type"] == "qwen2"

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * WEIGHT_STD

    tensors = {"model.embed_tokens.weight": normal(v, h)}
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        tensors[p + "self_attn.q_proj.weight"] = normal(q_out, h)
        tensors[p + "self_attn.k_proj.weight"] = normal(kv_out, h)
        tensors[p + "self_attn.v_proj.weight"] = normal(kv_out, h)
        tensors[p + "self_attn.o_proj.weight"] = normal(h, q_out)
        if qkv_bias:
            tensors[p + "self_attn.q_proj.bias"] = normal(q_out)
            tensors[p + "self_attn.k_proj.bias"] = normal(kv_out)
            tensors[p + "self_attn.v_proj.bias"] = normal(kv_out)
        tensors[p + "mlp.gate_proj.weight"] = normal(i, h)
        tensors[p + "mlp.up_proj.weight"] = normal(i, h)
        tensors[p + "mlp.down_proj.weight"] = normal(h, i)
        tensors[p + "input_layernorm.weight"] = torch.ones(h)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(h)
    tensors["model.norm.weight"] = torch.ones(h)
    if not config["tie_word_embeddings"]:
        tensors["lm_head.weight"] = normal(v, h)
    return tensors


def write_tokenizer(out_dir: Path, arch: str = "llama") -> Tokenizer:
    """Writes the tiny `arch` tokenizer (tokenizer.json, tokenizer_config.json with its chat template) into
    out_dir and returns it. Beside a full-size config it makes a folder a server that insists on a tokenizer
    (SGLang) can serve with dummy weights."""
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"unknown arch {arch!r} (known: llama, qwen2)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if arch == "llama":
        tok = train_tokenizer(_LLAMA_SPECIALS, bos="<|begin_of_text|>")
    else:
        tok = train_tokenizer(_QWEN2_SPECIALS, bos=None)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(arch), indent=2) + "\n")
    return tok


def write_tiny_model(out_dir: Path, arch: str = "llama", seed: int = 0) -> Path:
    """Writes a tiny `arch` ("llama" | "qwen2") model into out_dir; returns out_dir."""
    out_dir = Path(out_dir)
    tok = write_tokenizer(out_dir, arch)
    config = _config(arch, tok)
    save_file(random_weights(config, seed), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")  # last: marks the model complete
    return out_dir


def _is_complete(model_dir: Path) -> bool:
    return all(
        (model_dir / f).exists()
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    )


def ensure_default_models(root: Path) -> dict[str, Path]:
    """Writes the default tiny models under root (root/<name>) unless present."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, arch in DEFAULT_TINY_MODELS.items():
        path = root / name
        if not _is_complete(path):
            # Written aside and renamed into place, so a crash or a concurrent
            # writer never leaves a half-written model that looks complete.
            tmp = root / f".{name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            write_tiny_model(tmp, arch=arch)
            shutil.rmtree(path, ignore_errors=True)
            try:
                tmp.rename(path)
            except OSError:
                if not _is_complete(path):  # not a concurrent writer that won the race
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        paths[name] = path.resolve()
    return paths
