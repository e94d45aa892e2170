"""The tensor-parallel ranks other than 0: each runs, on its shard of the
model and its share of the KV heads, the forward of every step that rank 0's
engine plans.

Rank 0's engine owns everything else (requests, the scheduler, the KV
slots, sampling). Once its KV pool exists it sends its size (ShardSetup);
before each forward it sends the step's inputs over the StepChannel (token ids, positions, every sequence's span and slots); each
follower builds the same step and runs its forward, whose all-reduces meet
rank 0's. The slots are rank 0's: a follower's pool is as large as rank 0's,
and its K/V for a slot is that slot's share of the heads.

The channel is torch.distributed's broadcast of a pickled object over its
group (gloo: host memory, no device sync), issued by rank 0's step thread in
the same order as the forwards, so collectives never interleave."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.gpu_agent.engine.kv_pool import KVGeometry, PagePool
from services.gpu_agent.engine.model_config import load_model_config
from services.gpu_agent.engine.paged_attention import build_step_attention
from services.gpu_agent.engine.tensor_parallel import TensorParallel
from services.gpu_agent.engine.weights import load_model, resolve_dtype

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSetup:
    """Rank 0's first message, once its KV pool exists: how many slots it can
    hand out (the followers' pools hold as many)."""

    kv_capacity_tokens: int


@dataclass(frozen=True)
class ForwardStep:
    """One forward's inputs, as rank 0's engine built them."""

    input_ids: list[int]
    positions: list[int]
    spans: list[tuple[int, int, list[int]]]  # (start, count, slots of positions 0..start+count)
    logits_at: list[int]


@dataclass(frozen=True)
class StopFollowing:
    """Rank 0's engine stopped: the followers end."""


class StepChannel:
    """Rank 0 sends, the other ranks receive, one message at a time, in order."""

    def __init__(self, tp: TensorParallel, group: Any = None):
        self.tp = tp
        self.group = group

    def _source(self) -> int:
        import torch.distributed as dist

        return 0 if self.group is None else dist.get_global_rank(self.group, 0)

    def send(self, message: ShardSetup | ForwardStep | StopFollowing) -> None:
        if self.tp.rank != 0:
            raise RuntimeError("only tensor-parallel rank 0 sends steps")
        import torch.distributed as dist

        dist.broadcast_object_list([message], src=self._source(), group=self.group)

    def receive(self) -> ShardSetup | ForwardStep | StopFollowing:
        import torch.distributed as dist

        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=self._source(), group=self.group)
        return box[0]


def follow(model_path: str | Path, tp: TensorParallel, channel: StepChannel, *, dtype: str = "auto",
           load_format: str = "auto", device: str = "cpu", seed: int = 0) -> int:
    """Loads this rank's shard and runs rank 0's steps until it stops; returns
    how many forwards ran. dtype, load_format and seed: as rank 0's engine was
    given them (the same dummy weights need the same seed)."""
    if tp.rank == 0:
        raise ValueError("rank 0 runs the engine, not a follower")
    model_path = Path(model_path)
    config = load_model_config(model_path)
    device = torch.device(device)
    weights_dtype = resolve_dtype(dtype, config, device)
    # From a checkpoint the weights are read into host memory (the engine moves its own on activation).
    model = load_model(config, model_path, load_format, weights_dtype, device, seed, tp).to(device)
    setup = channel.receive()
    if not isinstance(setup, ShardSetup):
        raise RuntimeError(f"rank 0 sent {type(setup).__name__} before its ShardSetup")
    geometry = KVGeometry(config.num_hidden_layers, config.num_key_value_heads // tp.size, config.head_dim,
                          weights_dtype)
    # Every slot rank 0 can hand out, written at once: the pool's own accounting is not used here.
    capacity = setup.kv_capacity_tokens
    pool = PagePool(geometry, capacity, capacity * geometry.token_bytes, device)
    log.info("tensor-parallel rank %d of %d: %s loaded, KV for %d tokens", tp.rank, tp.size, model_path.name,
             pool.capacity_tokens)
    forwards = 0
    with torch.inference_mode():
        while True:
            message = channel.receive()
            if isinstance(message, StopFollowing):
                break
            step = build_step_attention(message.spans, 0, device, dtype=weights_dtype)
            model(torch.tensor(message.input_ids, device=device), torch.tensor(message.positions, device=device),
                  pool, step, torch.tensor(message.logits_at, dtype=torch.long, device=device))
            forwards += 1
    pool.close()
    log.info("tensor-parallel rank %d of %d: stopped after %d forwards", tp.rank, tp.size, forwards)
    return forwards
