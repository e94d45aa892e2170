"""What the simulator needs of each configured model: its weight bytes and
KV geometry (from its config.json, as the scheduler estimates them before an
agent reports), its SLO and priority as the agent would see them.

A model split over `tp_size` GPUs (tensor parallelism) holds 1/tp_size of its
weights and of its KV heads on each (services/gpu_agent/engine/tensor_parallel.py,
the vocabulary split too): `shard_weight_bytes` and `kv_bytes_per_token` are one
GPU's, as the agent's rank-0 engine counts them. Its KV is a fixed reservation
(the agent never balloons a split built-in engine): the load's memory limit,
or 8 contexts (`fixed_kv_bytes`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from services.common.model_size import estimate_weight_bytes
from services.common.placement_config import ModelConfig
from services.gpu_agent.engine.kv_pool import DEFAULT_PAGE_BYTES
from services.gpu_agent.engine.kv_pool_factory import default_kv_limit_bytes
from services.gpu_agent.slo import DEFAULT_TPOT_MS, DEFAULT_TTFT_MS

DEFAULT_MAX_CONTEXT = 8192


@dataclass(frozen=True)
class SimModel:
    config: ModelConfig
    weight_bytes: int
    kv_bytes_per_token: int
    tokens_per_page: int  # slots in one kvcached page (2 MiB of one layer's K or V buffer)
    max_context: int
    ttft_s: float  # the agent's admission deadline
    tpot_s: float

    @property
    def name(self) -> str:
        return self.config.model_name

    @property
    def priority(self) -> int:
        return self.config.priority

    @property
    def bundle_bytes(self) -> int:
        """One page in every K and V buffer: the unit of its KV limit."""
        return self.tokens_per_page * self.kv_bytes_per_token

    @property
    def tp_size(self) -> int:
        return self.config.tp_size

    @property
    def shard_weight_bytes(self) -> int:
        """Its weights on each of its GPUs."""
        return self.weight_bytes // self.tp_size

    def fixed_kv_bytes(self, limit_bytes: int = 0) -> int:
        """A split model's KV on each GPU: the load's limit, or the engine's
        default of 8 contexts in whole page bundles (kv_pool_factory.py)."""
        if limit_bytes > 0:
            return limit_bytes
        return default_kv_limit_bytes(self.max_context, self.kv_bytes_per_token, self.bundle_bytes)


def sim_model(config: ModelConfig) -> SimModel:
    try:
        cfg = json.loads((Path(config.model_path) / "config.json").read_text())
        heads = int(cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim", int(cfg["hidden_size"]) // heads))
        kv_heads = int(cfg.get("num_key_value_heads", heads))
        layers = int(cfg["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{config.model_name}: cannot read {config.model_path}/config.json ({exc}); the simulator "
            "needs each model's config.json (e.g. bench/configs/llama-3.2-1b)"
        ) from None
    element = {"float32": 4}.get(config.dtype if config.dtype != "auto" else str(cfg.get("torch_dtype")), 2)
    if kv_heads % config.tp_size:
        raise ValueError(
            f"{config.model_name}: tp_size {config.tp_size} does not divide its {kv_heads} key/value heads"
        )
    slot_bytes = kv_heads // config.tp_size * head_dim * element  # one token in one layer's K or V buffer, one GPU's
    return SimModel(
        config=config,
        weight_bytes=estimate_weight_bytes(config.model_path, config.dtype),
        kv_bytes_per_token=2 * layers * slot_bytes,
        tokens_per_page=max(1, DEFAULT_PAGE_BYTES // slot_bytes),
        max_context=min(int(cfg.get("max_position_embeddings", DEFAULT_MAX_CONTEXT)), DEFAULT_MAX_CONTEXT),
        ttft_s=(config.ttft_slo_ms or DEFAULT_TTFT_MS) / 1000,
        tpot_s=(config.tpot_slo_ms or DEFAULT_TPOT_MS) / 1000,
    )
