"""Tensor parallelism for the decoder, Megatron-style: each of `size` ranks
(one process per GPU) holds 1/size of every layer's attention heads and MLP
columns, and two all-reduces a layer give every rank the whole hidden state.

Column-parallel (each rank keeps a block of output rows): q, k and v (whole
heads: query heads and KV heads split alike, so each rank's queries meet
their own KV heads) and gate and up. Row-parallel (a block of input columns):
o and down; their partial outputs are summed across ranks by the all-reduce,
so a bias there is kept by rank 0 alone. Vocabulary-parallel (a block of
vocabulary rows, where the rank count divides the vocabulary): the token
embedding (each rank looks up the tokens in its rows, zeros for the others,
and an all-reduce sums them) and the LM head (each rank's block of logits,
then an all-gather); a vocabulary that does not divide is replicated, as the
norms are. Every rank ends a step with the same logits. Splitting the
vocabulary saves each rank (size-1)/size of both matrices: a 70B Llama's are
2.1 GB each in bf16, so on 4 ranks every shard is 3.2 GB smaller (38.4 ->
35.3 GB), and its activation copies that much less.

Each rank's KV cache holds only its KV heads, so a model's KV memory is split
across its GPUs as its weights are. The weights of a checkpoint or of the
seeded dummy init are cut per tensor (shard_of), so the shards of a model are
exactly the slices of its unsplit weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.gpu_agent.engine.model_config import ModelConfig

# Parameter name endings -> the dimension split across ranks.
_COLUMN_PARALLEL = (
    "q_proj.weight",
    "k_proj.weight",
    "v_proj.weight",
    "q_proj.bias",
    "k_proj.bias",
    "v_proj.bias",
    "gate_proj.weight",
    "up_proj.weight",
    "gate_proj.bias",
    "up_proj.bias",
)
_ROW_PARALLEL = ("o_proj.weight", "down_proj.weight")
_ROW_PARALLEL_BIAS = ("o_proj.bias", "down_proj.bias")
_VOCAB_PARALLEL = ("embed_tokens.weight", "lm_head.weight")


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

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' x side by side along the last dimension, in rank order
        (a vocabulary-parallel LM head's blocks of logits: the whole vocabulary)."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=-1)

    def vocab_rows(self, vocab_size: int) -> tuple[int, int]:
        """This rank's rows of the embedding and the LM head: (first, count);
        all of them where the ranks do not divide the vocabulary."""
        if self.size == 1 or vocab_size % self.size:
            return 0, vocab_size
        count = vocab_size // self.size
        return self.rank * count, count


SINGLE = TensorParallel(0, 1)


def check_divisible(config: ModelConfig, size: int) -> None:
    for what, count in (
        ("attention heads", config.num_attention_heads),
        ("key/value heads", config.num_key_value_heads),
        ("intermediate size", config.intermediate_size),
    ):
        if count % size:
            raise TensorParallelError(f"tp_size {size} does not divide the model's {count} {what}")


def split_dim(name: str) -> int | None:
    """The dimension of a layer's parameter `name` split across ranks; None:
    replicated (the embedding and LM head: see TensorParallel.vocab_rows)."""
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
    if name.endswith(_VOCAB_PARALLEL):
        first, count = tp.vocab_rows(full.shape[0])
        return full.narrow(0, first, count)
    dim = split_dim(name)
    if dim is None:
        return full
    if full.shape[dim] % tp.size:
        raise TensorParallelError(f"{name}: dimension {dim} of {tuple(full.shape)} does not split {tp.size} ways")
    part = full.shape[dim] // tp.size
    return full.narrow(dim, tp.rank * part, part)


def full_shape(name: str, shard_shape: torch.Size, tp: TensorParallel, vocab_size: int) -> tuple[int, ...]:
    """The shape of parameter `name` unsplit, given this rank's shard of it."""
    shape = list(shard_shape)
    if name.endswith(_VOCAB_PARALLEL):
        shape[0] = vocab_size
        return tuple(shape)
    dim = split_dim(name)
    if dim is not None:
        shape[dim] *= tp.size
    return tuple(shape)
