"""Rotary position embedding in the "rotate half" layout that Hugging Face
Llama/Qwen2 checkpoints use (their q/k weights are permuted for it), with the
linear and Llama-3 frequency scalings."""

from __future__ import annotations

import math

import torch

from services.gpu_agent.engine.model_config import ModelConfig, RopeScaling


def _llama3_scaled(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    # Llama 3.x keeps high frequencies (short wavelengths), divides low
    # frequencies by `factor`, and interpolates smoothly in between.
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    interpolated = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, interpolated, scaled)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies, float32, shape [head_dim // 2]."""
    dim = config.head_dim
    # int arange then float, like the reference implementation, so the
    # frequencies match real checkpoints' training bit for bit.
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = config.rope_scaling
    if s is None:
        return inv_freq
    if s.rope_type == "linear":
        return inv_freq / s.factor
    return _llama3_scaled(inv_freq, s)


class RotaryEmbedding(torch.nn.Module):
    inv_freq: torch.Tensor  # a buffer (register_buffer)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Computed only where it is real: arithmetic on the meta device, where models are built, imports
        # torch._dynamo on its first use (1.7 s of an engine process's start on the CPU).
        self.register_buffer("inv_freq", torch.empty(config.head_dim // 2, dtype=torch.float32), persistent=False)
        if self.inv_freq.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        # Models are built on the meta device and materialized with
        # to_empty(), which leaves this buffer uninitialized.
        self.inv_freq.copy_(rope_inv_freq(self.config))

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and the signed sin (see apply_rotary) for each position, shape
        [tokens, head_dim]; computed once a step, used by every layer."""
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)
        sin = angles.sin()
        half = sin.shape[-1] // 2
        sin[:, :half].neg_()
        return angles.cos().to(dtype), sin.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos/signed_sin: [tokens, head_dim].
    The usual x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x2, x1):
    swapping the halves is a flip of a [2, half] view, and the minus sign is
    folded into the first half of signed_sin. Fewer kernels a layer: on small
    models a decode step's time is mostly its kernel count."""
    half = x.shape[-1] // 2
    swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)
    if x.is_cuda:
        return torch.addcmul(x * cos[:, None, :], swapped, signed_sin[:, None, :])
    return x * cos[:, None, :] + swapped * signed_sin[:, None, :]
