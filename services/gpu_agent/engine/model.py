"""The Llama/Qwen2 decoder in plain torch.

Module and parameter names follow the Hugging Face checkpoints
(model.layers.N.self_attn.q_proj.weight, ...), so state-dict keys load as they
are. One forward runs a step for several sequences at once: their new tokens
are concatenated into one flat batch for every matmul; attention reads and
writes the engine's paged KV pool (paged_attention.py). Split over several
GPUs (tensor_parallel.py), each rank's modules hold its share of the heads and
MLP columns and sum their partial outputs after o_proj and down_proj."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from services.gpu_agent.engine.kv_pool import KVPool
from services.gpu_agent.engine.model_config import ModelConfig
from services.gpu_agent.engine.paged_attention import StepAttention, paged_attention, write_kv
from services.gpu_agent.engine.rotary import RotaryEmbedding, apply_rotary
from services.gpu_agent.engine.tensor_parallel import SINGLE, TensorParallel


class Linear(nn.Linear):
    """nn.Linear without its random initialization: the model is built on the meta device and every
    weight is then loaded (a checkpoint, or the dummy loader's seeded values). Initializing there
    was not only wasted: the first such call imports torch._dynamo, 1.7 s of every engine process's
    start on the CPU."""

    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    """nn.Embedding without its random initialization (see Linear)."""

    def reset_parameters(self) -> None:
        pass


def _fused_ops():
    """fused_ops.py, imported on first use on CUDA: importing the engine imports no triton."""
    from services.gpu_agent.engine import fused_ops

    return fused_ops


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            # One fused kernel (it accumulates in float32), not five: a decode
            # step's time on a small model is mostly its number of kernels.
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalize in float32 (as the checkpoints were trained), scale in the model dtype.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rows_back_to_back(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The 2-D tensors as one [sum of rows, cols] matrix, without a copy, where
    they lie back to back in one storage, as HostWeights packs a model's
    parameters on the device (q, k and v projections; gate and up); else None.
    One matmul over the joined weights replaces two or three small ones."""
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    at = first.data_ptr()
    for t in tensors:
        if (
            t.dim() != 2
            or t.dtype != first.dtype
            or t.shape[1] != first.shape[1]
            or not t.is_contiguous()
            or t.data_ptr() != at
            or t.untyped_storage().data_ptr() != storage
        ):
            return None
        at += t.numel() * t.element_size()
    rows = sum(t.shape[0] for t in tensors)
    return first.as_strided((rows, first.shape[1]), first.stride(), first.storage_offset())


class JoinedWeights:
    """rows_back_to_back over some linears' weights, found again whenever the
    weights move (activation rebinds them into a new device buffer)."""

    def __init__(self, *linears: nn.Linear):
        self._linears = linears
        self._key: tuple[int, ...] = ()
        self._joined: torch.Tensor | None = None

    def get(self) -> torch.Tensor | None:
        if any(linear.bias is not None for linear in self._linears):
            return None
        key = tuple(linear.weight.data_ptr() for linear in self._linears)
        if key != self._key:
            self._key, self._joined = key, rows_back_to_back([linear.weight for linear in self._linears])
        return self._joined

    def forget(self) -> None:
        """Drops the joined view: it would keep moved-away weights' memory alive."""
        self._key, self._joined = (), None


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, tp: TensorParallel = SINGLE):
        super().__init__()
        self.tp = tp
        self.num_heads = config.num_attention_heads // tp.size  # this rank's
        self.num_kv_heads = config.num_key_value_heads // tp.size
        self.head_dim = config.head_dim
        hidden = config.hidden_size
        self.q_proj = Linear(hidden, self.num_heads * self.head_dim, bias=config.qkv_bias, dtype=dtype)
        self.k_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.qkv_bias, dtype=dtype)
        self.v_proj = Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.qkv_bias, dtype=dtype)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=config.o_bias, dtype=dtype)
        self._qkv = JoinedWeights(self.q_proj, self.k_proj, self.v_proj)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layer: int,
        pool: KVPool,
        step: StepAttention,
        fused: bool = False,
    ) -> torch.Tensor:
        tokens = x.shape[0]
        qkv_weight = self._qkv.get()
        k_buffer, v_buffer = pool.k_buffers[layer], pool.v_buffers[layer]
        if fused:
            # One kernel for the rotary embedding of q and k and the slot writes of k and v.
            q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            if qkv_weight is not None:
                qkv = F.linear(x, qkv_weight)
                q, k, v = qkv[:, :q_size], qkv[:, q_size : q_size + kv_size], qkv[:, q_size + kv_size :]
            else:  # biases: three matmuls
                q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q = _fused_ops().rotary_write_kv(q, k, v, cos, sin, k_buffer, v_buffer, step.slot_mapping)
            return self.tp.all_reduce(self.o_proj(paged_attention(q, k_buffer, v_buffer, step).reshape(tokens, -1)))
        if qkv_weight is not None:
            # One matmul, and the rotary embedding over q's and k's heads at once.
            qkv = F.linear(x, qkv_weight)
            qk_size = (self.num_heads + self.num_kv_heads) * self.head_dim
            qk = apply_rotary(qkv[:, :qk_size].view(tokens, -1, self.head_dim), cos, sin)
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
            v = qkv[:, qk_size:].view(tokens, self.num_kv_heads, self.head_dim)
        else:
            q = apply_rotary(self.q_proj(x).view(tokens, self.num_heads, self.head_dim), cos, sin)
            k = apply_rotary(self.k_proj(x).view(tokens, self.num_kv_heads, self.head_dim), cos, sin)
            v = self.v_proj(x).view(tokens, self.num_kv_heads, self.head_dim)
        write_kv(k_buffer, v_buffer, step, k, v)
        return self.tp.all_reduce(self.o_proj(paged_attention(q, k_buffer, v_buffer, step).reshape(tokens, -1)))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, tp: TensorParallel = SINGLE):
        super().__init__()
        self.tp = tp
        h, i, bias = config.hidden_size, config.intermediate_size // tp.size, config.mlp_bias
        self.gate_proj = Linear(h, i, bias=bias, dtype=dtype)
        self.up_proj = Linear(h, i, bias=bias, dtype=dtype)
        self.down_proj = Linear(i, h, bias=bias, dtype=dtype)
        self._gate_up = JoinedWeights(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor, fused: bool = False) -> torch.Tensor:
        gate_up_weight = self._gate_up.get()
        if gate_up_weight is not None and fused:
            return self.tp.all_reduce(self.down_proj(_fused_ops().silu_mul(F.linear(x, gate_up_weight))))
        if gate_up_weight is not None:
            gate, up = F.linear(x, gate_up_weight).chunk(2, dim=-1)
            return self.tp.all_reduce(self.down_proj(F.silu(gate) * up))
        return self.tp.all_reduce(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, tp: TensorParallel = SINGLE):
        super().__init__()
        self.self_attn = Attention(config, dtype, tp)
        self.mlp = MLP(config, dtype, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: int, pool: KVPool, step: StepAttention
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layer, pool, step)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fused(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        layer: int,
        pool: KVPool,
        step: StepAttention,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The same layer with the fused kernels (fused_ops.py), the residual
        stream carried apart: x is the previous layer's MLP output (or the
        embeddings, with residual None); returns this layer's MLP output and the
        residual stream before it. The next layer (or the final norm) adds them,
        in one kernel with its norm."""
        fused_ops = _fused_ops()
        norm = self.input_layernorm
        h, residual = fused_ops.add_rms_norm(x, residual, norm.weight, norm.eps)
        attended = self.self_attn(h, cos, sin, layer, pool, step, fused=True)
        norm = self.post_attention_layernorm
        h, residual = fused_ops.add_rms_norm(attended, residual, norm.weight, norm.eps)
        return self.mlp(h, fused=True), residual


class DecoderStack(nn.Module):
    """What Hugging Face calls `model` inside `*ForCausalLM`."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, tp: TensorParallel = SINGLE):
        super().__init__()
        # This rank's vocabulary rows (all of them unless split: tensor_parallel.py).
        self.vocab_first, vocab_rows = tp.vocab_rows(config.vocab_size)
        self.embed_tokens = Embedding(vocab_rows, config.hidden_size, dtype=dtype)
        layers = [DecoderLayer(config, dtype, tp) for _ in range(config.num_hidden_layers)]
        self.layers = nn.ModuleList(layers)
        self.decoder_layers = layers  # the same modules, typed: a ModuleList yields plain Modules
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.rotary = RotaryEmbedding(config)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, tp: TensorParallel = SINGLE):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.tp = tp
        # The fused kernels (fused_ops.py) on CUDA; False keeps the torch ops everywhere,
        # None decides on the first CUDA forward (fused_ops.fused_ops_enabled()).
        self.use_fused_ops: bool | None = None
        self.model = DecoderStack(config, dtype, tp)
        self.lm_head = Linear(config.hidden_size, self.model.embed_tokens.num_embeddings, bias=False, dtype=dtype)
        self.tie_weights()
        self.vocab_split = self.model.embed_tokens.num_embeddings != config.vocab_size

    def _fused(self) -> bool:
        if self.use_fused_ops is None:
            self.use_fused_ops = _fused_ops().fused_ops_enabled()
        return self.use_fused_ops

    @property
    def weight_bytes(self) -> int:
        """Bytes of its parameters (this rank's shard where it is split)."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def forget_joined_weights(self) -> None:
        """Call when the weights move (deactivation, activation)."""
        for module in self.modules():
            for joined in (getattr(module, "_qkv", None), getattr(module, "_gate_up", None)):
                if isinstance(joined, JoinedWeights):
                    joined.forget()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.vocab_split:
            return self.model.embed_tokens(input_ids)
        # Each rank embeds the tokens in its rows and zeros the rest; the all-reduce puts them together.
        local = input_ids - self.model.vocab_first
        outside = (local < 0) | (local >= self.model.embed_tokens.num_embeddings)
        x = self.model.embed_tokens(local.masked_fill(outside, 0))
        return self.tp.all_reduce(x.masked_fill_(outside.unsqueeze(-1), 0))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits over the whole vocabulary (a split LM head's blocks gathered)."""
        logits = self.lm_head(hidden)
        return (self.tp.all_gather_last(logits) if self.vocab_split else logits).float()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        pool: KVPool,
        step: StepAttention,
        logits_at: torch.Tensor,
    ) -> torch.Tensor:
        """input_ids/positions: [tokens], the step's new tokens in span order.
        Returns float32 logits of the tokens at logits_at, [len(logits_at), vocab]."""
        x = self.embed(input_ids)
        cos, sin = self.model.rotary.cos_sin(positions, x.dtype)
        if x.is_cuda and self._fused():
            residual: torch.Tensor | None = None
            with step.sdpa_context(x.device):
                for i, layer in enumerate(self.model.decoder_layers):
                    x, residual = layer.forward_fused(x, residual, cos, sin, i, pool, step)
            assert residual is not None  # a model has layers
            if logits_at.shape[0] != x.shape[0]:  # not a pure decode step: only the tokens that sample
                x, residual = x[logits_at], residual[logits_at]
            norm = self.model.norm
            return self.logits(_fused_ops().add_rms_norm(x, residual, norm.weight, norm.eps)[0])
        with step.sdpa_context(x.device):
            for i, layer in enumerate(self.model.decoder_layers):
                x = layer(x, cos, sin, i, pool, step)
        if logits_at.shape[0] != x.shape[0]:  # not a pure decode step: only the tokens that sample
            x = x[logits_at]
        return self.logits(self.model.norm(x))
