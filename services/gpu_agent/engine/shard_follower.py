"""The tensor-parallel ranks other than 0: each runs, on its shard of the
model and its share of the KV heads, the forward of every step that rank 0's
engine plans.

Rank 0's engine owns everything else (requests, the scheduler, the KV
slots, sampling). Once its KV pool exists it sends its size (ShardSetup);
before each forward, the step's inputs (ForwardStep: token ids, positions,
every sequence's span and slots); switching off and on, SwitchOff and
SwitchOn. Each follower builds the same step (its slots mirrored a step at
a time: slot_mirror.py) and runs its forward, whose
all-reduces meet rank 0's. The slots are rank 0's: a follower's pool is as
large as rank 0's, and its K/V for a slot is that slot's share of the heads.

The channel (StepChannel) is torch.distributed's broadcast of a pickled
object over its group (gloo: host memory, no device sync). Rank 0 sends
only under its model lock or after its step thread ended, in the order of
its forwards, so collectives never interleave.

A step that fails on any rank ends the split engine: a follower's run raises
(its worker then ends itself), rank 0's engine fails every request and refuses
more (Engine._fail_split; its worker ends too). A peer whose process has gone
fails the collectives the others wait in, and the agent ends every rank's
worker once one has gone (workers/remote_engine.py)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.gpu_agent.engine.host_weights import HostWeights
from services.gpu_agent.engine.kv_pool import KVGeometry, PagePool
from services.gpu_agent.engine.model_config import load_model_config
from services.gpu_agent.engine.paged_attention import build_step_attention
from services.gpu_agent.engine.slot_mirror import SlotsKnown, SpanUpdate
from services.gpu_agent.engine.tensor_parallel import TensorParallel
from services.gpu_agent.engine.weights import load_model, resolve_dtype, use_device_on_this_thread

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSetup:
    """Rank 0's first message, once its KV pool exists: how many slots it can
    hand out (the followers' pools hold as many)."""

    kv_capacity_tokens: int


@dataclass(frozen=True)
class ForwardStep:
    """One forward's inputs, as rank 0's engine built them; of each sequence's slots only those the
    followers have not seen (slot_mirror.py)."""

    input_ids: list[int]
    positions: list[int]
    spans: list[SpanUpdate]
    logits_at: list[int]
    finished: list[int]  # the sequences the followers may forget after this step


@dataclass(frozen=True)
class SwitchOff:
    """Rank 0's engine is switching off: the followers free their device copy of the weights and KV
    memory, then meet rank 0 at a barrier (its deactivation ends when every rank's memory is free)."""


@dataclass(frozen=True)
class SwitchOn:
    """Rank 0's engine is switching on: the followers copy their weights back while it copies its
    own; its ShardSetup follows, then every rank meets at a barrier."""


@dataclass(frozen=True)
class StopFollowing:
    """Rank 0's engine stopped: the followers end."""


Message = ShardSetup | ForwardStep | SwitchOff | SwitchOn | StopFollowing


class StepChannel:
    """Rank 0 sends, the other ranks receive, one message at a time, in order."""

    def __init__(self, tp: TensorParallel, group: Any = None):
        self.tp = tp
        self.group = group

    def _source(self) -> int:
        import torch.distributed as dist

        return 0 if self.group is None else dist.get_global_rank(self.group, 0)

    def send(self, message: Message) -> None:
        if self.tp.rank != 0:
            raise RuntimeError("only tensor-parallel rank 0 sends steps")
        import torch.distributed as dist

        dist.broadcast_object_list([message], src=self._source(), group=self.group)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.group)

    def receive(self) -> Message:
        import torch.distributed as dist

        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=self._source(), group=self.group)
        return box[0]


def join_ranks(
    rank: int, size: int, init_method: str, device: str | torch.device, timeout_s: float = 600.0
) -> tuple[TensorParallel, StepChannel]:
    """Joins this process to its model's ranks: the default process group (NCCL
    on CUDA, for the all-reduces; gloo on the CPU) and, on CUDA, a gloo group
    beside it for the step channel, whose messages stay in host memory. One
    model's ranks a process: workers hold one engine each."""
    from datetime import timedelta

    import torch.distributed as dist

    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=rank,
        world_size=size,
        timeout=timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    tp = TensorParallel(rank, size)
    group = dist.new_group(backend="gloo") if backend != "gloo" else None
    return tp, StepChannel(tp, group)


def follow(
    model_path: str | Path,
    tp: TensorParallel,
    channel: StepChannel,
    *,
    dtype: str = "auto",
    load_format: str = "auto",
    device: str = "cpu",
    seed: int = 0,
) -> int:
    """Loads this rank's shard and runs rank 0's steps until it stops; returns
    how many forwards ran. dtype, load_format and seed: as rank 0's engine was
    given them (the same dummy weights need the same seed)."""
    return ShardFollower(Path(model_path), tp, dtype, load_format, torch.device(device), seed).run(channel)


class ShardFollower:
    """One follower rank's shard, host copy and KV pool."""

    def __init__(
        self, model_path: Path, tp: TensorParallel, dtype: str, load_format: str, device: torch.device, seed: int
    ):
        if tp.rank == 0:
            raise ValueError("rank 0 runs the engine, not a follower")
        config = load_model_config(model_path)
        self.tp = tp
        self.device = device
        use_device_on_this_thread(device)
        self.dtype = resolve_dtype(dtype, config, device)
        # From a checkpoint the weights are read into host memory first.
        self.model = load_model(config, model_path, load_format, self.dtype, device, seed, tp).to(device)
        # As the engine does: a pinned host copy where the weights move, so switching on is one copy.
        self.host = HostWeights(self.model) if device.type == "cuda" else None
        if self.host is not None:
            self.host.to_host()
            self.host.to_device(device)
        self.geometry = KVGeometry(
            config.num_hidden_layers, config.num_key_value_heads // tp.size, config.head_dim, self.dtype
        )
        self.pool: PagePool | None = None
        self.slots = SlotsKnown()
        self.forwards = 0
        log.info("tensor-parallel rank %d of %d: %s loaded", tp.rank, tp.size, model_path.name)

    def run(self, channel: StepChannel) -> int:
        """Rank 0's messages until it stops; returns how many forwards ran."""
        tp = self.tp
        use_device_on_this_thread(self.device)  # the worker runs this on a thread of its own
        with torch.inference_mode():
            while True:
                message = channel.receive()
                if isinstance(message, StopFollowing):
                    break
                if isinstance(message, ForwardStep):
                    self.forward(message)
                elif isinstance(message, ShardSetup):
                    self.setup(message)
                elif isinstance(message, SwitchOff):
                    self.switch_off()
                    channel.barrier()
                elif isinstance(message, SwitchOn):
                    self.switch_on()
                    setup = channel.receive()
                    if not isinstance(setup, ShardSetup):
                        raise RuntimeError(f"rank 0 sent {type(setup).__name__} after SwitchOn, not its ShardSetup")
                    self.setup(setup)
                    channel.barrier()
                else:
                    raise RuntimeError(f"rank 0 sent an unknown message: {type(message).__name__}")
        self.close()
        log.info("tensor-parallel rank %d of %d: stopped after %d forwards", tp.rank, tp.size, self.forwards)
        return self.forwards

    @property
    def weight_bytes(self) -> int:
        return self.model.weight_bytes

    def setup(self, message: ShardSetup) -> None:
        """A pool as large as rank 0's, every slot written at once: its own accounting is not used here."""
        capacity = message.kv_capacity_tokens
        if self.pool is not None and self.pool.capacity_tokens >= capacity:
            return
        if self.pool is not None:
            self.pool.close()
        self.pool = PagePool(self.geometry, capacity, capacity * self.geometry.token_bytes, self.device)

    def forward(self, message: ForwardStep) -> None:
        if self.pool is None:
            raise RuntimeError("rank 0 sent a step before its ShardSetup")
        device = self.device
        step = build_step_attention(self.slots.spans(message.spans, message.finished), 0, device, dtype=self.dtype)
        self.model(
            torch.tensor(message.input_ids, device=device),
            torch.tensor(message.positions, device=device),
            self.pool,
            step,
            torch.tensor(message.logits_at, dtype=torch.long, device=device),
        )
        self.forwards += 1

    def switch_off(self) -> None:
        """Off the device, as rank 0's engine: weights back to the host copy, the KV pool dropped (on
        the CPU nothing moves and the pool stays, as there)."""
        self.slots.clear()  # rank 0 ended every sequence
        if self.host is None:
            return
        self.model.forget_joined_weights()
        self.host.to_host()
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        torch.cuda.empty_cache()

    def switch_on(self) -> None:
        if self.host is not None:
            self.model.forget_joined_weights()
            self.host.to_device(self.device)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        if self.host is not None:
            self.host.close()
