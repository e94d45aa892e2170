"""Choosing the next token: greedy at temperature 0 (or below GREEDY_BELOW),
otherwise temperature and nucleus (top-p) sampling from a per-request
torch.Generator, so a request with a seed gets the same tokens every time
regardless of what else runs."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

# Temperatures below this decode greedily, as vLLM's do: logits divided by a float32 this small
# overflow to inf and the softmax to NaN (temperature 1e-45 failed the sampling, and with it every
# request in the same step), while what they would sample is the argmax anyway.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def make_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    if params.greedy:
        return None
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    return torch.Generator(device=device).manual_seed(seed % (1 << 63))


def sample_one(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """logits: float32 [vocab]; returns a 0-d token id tensor."""
    if params.greedy:
        return logits.argmax()
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest head of the distribution whose mass reaches top_p:
        # a token stays if the mass before it is still below top_p.
        keep = (sorted_probs.cumsum(-1) - sorted_probs) < params.top_p
        keep[0] = True
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return order[choice[0]]
    return torch.multinomial(probs, 1, generator=generator)[0]


def sample_batch(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    greedy: torch.Tensor | None = None,
) -> list[int]:
    """logits: float32 [batch, vocab]; one token per row. greedy: the rows'
    argmax where the caller has it already (a CUDA graph step computes it)."""
    if greedy is None:
        greedy = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        return greedy.tolist()  # one copy to the host, not one per row
    chosen = [
        greedy[i] if p.greedy else sample_one(logits[i], p, g) for i, (p, g) in enumerate(zip(params, generators))
    ]
    return torch.stack(chosen).tolist()
