"""Tensor parallelism for the decoder, Megatron-style: each of `size` ranks
(one process per GPU) holds 1/size of every layer's attention heads and MLP
columns, and two all-reduces a layer give every rank the whole hidden state.

Column-parallel (each rank keeps a block of output rows): q, k and v (whole
heads: query heads and KV heads split alike, so each rank's queries meet
their own KV heads) and gate and up. Row-parallel (a block of input columns):
o and down; their partial outputs are summed across ranks by the all-reduce,
so a bias there is kept by rank 0 alone. Embeddings, norms and the LM head
are replicated: every rank ends a step with the same logits.

Each rank's KV cache holds only its KV heads, so a model's KV memory is split
across its GPUs as its weights are. The weights of a checkpoint or of the
seeded dummy init are cut per tensor (shard_of), so the shards of a model are
exactly the slices of its unsplit weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.gpu_agent.engine.model_config import ModelConfig

# Parameter name endings -> the dimension split across ranks.
_COLUMN_PARALLEL = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "q_proj.bias", "k_proj.bias", "v_proj.bias",
                    "gate_proj.weight", "up_proj.weight", "gate_proj.bias", "up_proj.bias")
_ROW_PARALLEL = ("o_proj.weight", "down_proj.weight")
_ROW_PARALLEL_BIAS = ("o_proj.bias", "down_proj.bias")


class TensorParallelError(ValueError):
    """The model cannot be split over this many ranks."""


@dataclass(frozen=True)
class TensorParallel:
    """This process's rank among its model's; the ranks are torch.distributed's
    default group (shard_follower.join_ranks: one model's ranks a process)."""

    rank: int
    size: int

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise TensorParallelError(f"rank {self.rank} of {self.size} is not a valid tensor-parallel rank")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums x over the ranks, in place; x itself on one rank."""
        if self.size > 1:
            import torch.distributed as dist

            dist.all_reduce(x)
        return x


SINGLE = TensorParallel(0, 1)


def check_divisible(config: ModelConfig, size: int) -> None:
    for what, count in (("attention heads", config.num_attention_heads),
                        ("key/value heads", config.num_key_value_heads),
                        ("intermediate size", config.intermediate_size)):
        if count % size:
            raise TensorParallelError(f"tp_size {size} does not divide the model's {count} {what}")


def split_dim(name: str) -> int | None:
    """The dimension of parameter `name` split across ranks; None: replicated."""
    if name.endswith(_COLUMN_PARALLEL):
        return 0
    if name.endswith(_ROW_PARALLEL):
        return 1
    return None


def shard_of(name: str, full: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """This rank's part of parameter `name`, given the whole tensor (a view
    where it is a slice)."""
    if tp.size == 1:
        return full
    if name.endswith(_ROW_PARALLEL_BIAS):  # added once, after the all-reduce sums the ranks' parts
        return full if tp.rank == 0 else torch.zeros_like(full)
    dim = split_dim(name)
    if dim is None:
        return full
    if full.shape[dim] % tp.size:
        raise TensorParallelError(f"{name}: dimension {dim} of {tuple(full.shape)} does not split {tp.size} ways")
    part = full.shape[dim] // tp.size
    return full.narrow(dim, tp.rank * part, part)
