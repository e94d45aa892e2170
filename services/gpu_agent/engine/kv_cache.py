"""The key/value cache of one sequence: a contiguous buffer per sequence that
grows geometrically. (Paged KV shared by all sequences is a later step; the
engine's byte accounting already counts per token, not per buffer.)"""

from __future__ import annotations

import torch

_MIN_CAPACITY = 16


class SequenceKVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_tokens: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.max_tokens = max_tokens
        self.dtype = dtype
        self.device = device
        self.capacity = 0
        # [layers, kv_heads, capacity, head_dim] each
        self.keys = torch.empty(0)
        self.values = torch.empty(0)

    def ensure_capacity(self, tokens: int) -> None:
        if tokens <= self.capacity:
            return
        if tokens > self.max_tokens:
            raise ValueError(f"KV cache for {tokens} tokens exceeds the context of {self.max_tokens}")
        capacity = min(self.max_tokens, max(tokens, 2 * self.capacity, _MIN_CAPACITY))
        shape = (self.num_layers, self.num_kv_heads, capacity, self.head_dim)
        keys = torch.empty(shape, dtype=self.dtype, device=self.device)
        values = torch.empty(shape, dtype=self.dtype, device=self.device)
        if self.capacity:
            keys[:, :, : self.capacity].copy_(self.keys)
            values[:, :, : self.capacity].copy_(self.values)
        self.keys, self.values, self.capacity = keys, values, capacity

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores k/v ([tokens, kv_heads, head_dim]) at positions start.. and
        returns all keys and values up to them, [kv_heads, start + tokens, head_dim]."""
        end = start + k.shape[0]
        self.keys[layer, :, start:end].copy_(k.transpose(0, 1))
        self.values[layer, :, start:end].copy_(v.transpose(0, 1))
        return self.keys[layer, :, :end], self.values[layer, :, :end]
