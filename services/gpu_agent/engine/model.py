"""The Llama/Qwen2 decoder in plain torch.

Module and parameter names follow the Hugging Face checkpoints
(model.layers.N.self_attn.q_proj.weight, ...), so state-dict keys load as they
are. One forward handles a step for several sequences at once: their new
tokens are concatenated into one flat batch for every matmul, and only
attention runs per sequence, against that sequence's own KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from services.gpu_agent.engine.kv_cache import SequenceKVCache
from services.gpu_agent.engine.model_config import ModelConfig
from services.gpu_agent.engine.rotary import RotaryEmbedding, apply_rotary

# enable_gqa (torch >= 2.5) lets query heads share kv heads without copying them.
_SDPA_HAS_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)
# Not cuDNN attention on CUDA: it builds a graph for every new key length, so
# decoding (one longer each step) measured 3x slower per step than flash on an H100.
_CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class KVSpan:
    """The new tokens of one sequence in a step: they take cache positions
    [start, start + count) and attend to everything before them."""

    cache: SequenceKVCache
    start: int
    count: int


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in float32 (as the checkpoints were trained), scale in the model dtype.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=config.qkv_bias, dtype=dtype)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.qkv_bias, dtype=dtype)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.qkv_bias, dtype=dtype)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=config.o_bias, dtype=dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int, spans: list[KVSpan]) -> torch.Tensor:
        tokens = x.shape[0]
        q = apply_rotary(self.q_proj(x).view(tokens, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(tokens, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        outputs = []
        offset = 0
        for span in spans:
            end = offset + span.count
            keys, values = span.cache.write(layer, span.start, k[offset:end], v[offset:end])
            outputs.append(self._attend(q[offset:end], keys, values, span).reshape(span.count, -1))
            offset = end
        return self.o_proj(torch.cat(outputs, dim=0) if len(outputs) > 1 else outputs[0])

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, span: KVSpan) -> torch.Tensor:
        """q: [new tokens, heads, head_dim]; keys/values: [kv_heads, tokens so far, head_dim].
        Returns [new tokens, heads, head_dim]."""
        # 4-D inputs, so CUDA can pick its fused (flash / memory-efficient) kernels.
        query = q.transpose(0, 1).unsqueeze(0)
        keys, values = keys.unsqueeze(0), values.unsqueeze(0)
        group = self.num_heads // self.num_kv_heads
        gqa = {}
        if group > 1:
            if _SDPA_HAS_GQA:
                gqa = {"enable_gqa": True}
            else:
                keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        if span.count == 1:
            out = F.scaled_dot_product_attention(query, keys, values, **gqa)
        elif span.start == 0:
            out = F.scaled_dot_product_attention(query, keys, values, is_causal=True, **gqa)
        else:
            # New token i sits at position start + i and sees keys 0..start + i.
            key_pos = torch.arange(span.start + span.count, device=q.device)
            query_pos = torch.arange(span.start, span.start + span.count, device=q.device)
            mask = key_pos[None, :] <= query_pos[:, None]
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, **gqa)
        return out[0].transpose(0, 1)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias, dtype=dtype)
        self.up_proj = nn.Linear(h, i, bias=bias, dtype=dtype)
        self.down_proj = nn.Linear(i, h, bias=bias, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.self_attn = Attention(config, dtype)
        self.mlp = MLP(config, dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int, spans: list[KVSpan]) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, spans)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """What Hugging Face calls `model` inside `*ForCausalLM`."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, dtype) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.rotary = RotaryEmbedding(config)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.model = DecoderStack(config, dtype)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, spans: list[KVSpan]) -> torch.Tensor:
        """input_ids/positions: [tokens], the spans' new tokens in order.
        Returns float32 logits of each span's last token, [len(spans), vocab]."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary.cos_sin(positions, x.dtype)
        with sdpa_kernel(_CUDA_SDPA_BACKENDS) if x.is_cuda else contextlib.nullcontext():
            for i, layer in enumerate(self.model.layers):
                x = layer(x, cos, sin, i, spans)
        if x.shape[0] > len(spans):  # some span has several tokens (a prefill): take each span's last
            ends = [0]
            for s in spans:
                ends.append(ends[-1] + s.count)
            x = x[torch.tensor(ends[1:], device=x.device) - 1]
        return self.lm_head(self.model.norm(x)).float()
