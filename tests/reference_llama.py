"""An independent reference forward pass for Llama/Qwen2 checkpoints, for the
engine's parity tests.

Written apart from services/gpu_agent/engine and importing none of it: it
reads config.json and the safetensors itself, computes in float64, and
recomputes the whole sequence for every new token (no KV cache), with
attention as an explicit masked softmax. Whether a layer has biases is taken
from the tensors present, not from the config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file


class ReferenceLlama:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        self.cfg = json.loads((model_dir / "config.json").read_text())
        index = model_dir / "model.safetensors.index.json"
        files = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.exists()
            else ["model.safetensors"]
        )
        self.w: dict[str, torch.Tensor] = {}
        for name in files:
            self.w.update({k: t.to(torch.float64) for k, t in load_file(str(model_dir / name)).items()})
        if "lm_head.weight" not in self.w:  # tied embeddings
            self.w["lm_head.weight"] = self.w["model.embed_tokens.weight"]
        c = self.cfg
        self.n_heads = c["num_attention_heads"]
        self.n_kv = c.get("num_key_value_heads") or self.n_heads
        self.d = c.get("head_dim") or c["hidden_size"] // self.n_heads
        self.eps = c.get("rms_norm_eps", 1e-6)
        self.inv_freq = self._frequencies()

    def _frequencies(self) -> torch.Tensor:
        c = self.cfg
        theta = c.get("rope_theta", 10000.0)
        # Base frequencies rounded to float32, as checkpoints use them.
        base = [1.0 / (theta ** (float(torch.tensor(2 * i, dtype=torch.float32) / self.d))) for i in range(self.d // 2)]
        base = torch.tensor(base, dtype=torch.float32).tolist()
        scaling = c.get("rope_scaling") or {}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            return torch.tensor(base, dtype=torch.float64)
        if kind == "linear":
            return torch.tensor([f / scaling["factor"] for f in base], dtype=torch.float64)
        assert kind == "llama3", kind
        factor = scaling["factor"]
        lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        out = []
        for f in base:
            wavelength = 2 * math.pi / f
            if wavelength < old_ctx / hi:  # high frequency: unchanged
                out.append(f)
            elif wavelength > old_ctx / lo:  # low frequency: interpolated fully
                out.append(f / factor)
            else:  # in between: blend the two
                t = (old_ctx / wavelength - lo) / (hi - lo)
                out.append((1 - t) * f / factor + t * f)
        return torch.tensor(out, dtype=torch.float64)

    def _norm(self, x: torch.Tensor, weight: str) -> torch.Tensor:
        return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + self.eps) * self.w[weight]

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        y = x @ self.w[name + ".weight"].T
        bias = self.w.get(name + ".bias")
        return y if bias is None else y + bias

    def _rope(self, x: torch.Tensor) -> torch.Tensor:
        # x: [heads, seq, d]; pairs (i, i + d/2) rotate by position * inv_freq[i].
        seq = x.shape[1]
        angle = torch.arange(seq, dtype=torch.float64)[:, None] * self.inv_freq[None, :]
        cos, sin = torch.cos(angle), torch.sin(angle)
        a, b = x[..., : self.d // 2], x[..., self.d // 2 :]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    def logits(self, ids: list[int]) -> torch.Tensor:
        """Logits for the next token after ids, float64 [vocab]."""
        n = len(ids)
        x = self.w["model.embed_tokens.weight"][torch.tensor(ids)]
        future = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
        for layer in range(self.cfg["num_hidden_layers"]):
            p = f"model.layers.{layer}."
            h = self._norm(x, p + "input_layernorm.weight")
            q = self._linear(h, p + "self_attn.q_proj").view(n, self.n_heads, self.d).transpose(0, 1)
            k = self._linear(h, p + "self_attn.k_proj").view(n, self.n_kv, self.d).transpose(0, 1)
            v = self._linear(h, p + "self_attn.v_proj").view(n, self.n_kv, self.d).transpose(0, 1)
            q, k = self._rope(q), self._rope(k)
            heads = []
            for head in range(self.n_heads):
                kv = head * self.n_kv // self.n_heads  # query heads share kv heads in consecutive groups
                scores = (q[head] @ k[kv].T) / math.sqrt(self.d)
                scores = scores.masked_fill(future, float("-inf"))
                heads.append(torch.softmax(scores, dim=-1) @ v[kv])
            x = x + self._linear(torch.cat(heads, dim=-1), p + "self_attn.o_proj")
            h = self._norm(x, p + "post_attention_layernorm.weight")
            gate, up = self._linear(h, p + "mlp.gate_proj"), self._linear(h, p + "mlp.up_proj")
            x = x + self._linear(gate * torch.sigmoid(gate) * up, p + "mlp.down_proj")
        return self._linear(self._norm(x[-1], "model.norm.weight"), "lm_head")

    def greedy(self, prompt_ids: list[int], new_tokens: int) -> list[int]:
        ids = list(prompt_ids)
        for _ in range(new_tokens):
            ids.append(int(self.logits(ids).argmax()))
        return ids[len(prompt_ids) :]
