"""One request's state inside the engine: its tokens, how many of them have
their KV in the pool, the pool slots they hold, and the text streamed so far."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from services.gpu_agent.engine.detokenizer import IncrementalDetokenizer
from services.gpu_agent.engine.request import GenerationOutput
from services.gpu_agent.engine.sampling import SamplingParams

# Hands an output (or the exception ending the request) to the consumer;
# returns False when the consumer is gone.
Deliver = Callable[[GenerationOutput | BaseException], bool]


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    max_tokens: int  # resolved: never None here
    sampling: SamplingParams
    stop: list[str]
    ignore_eos: bool
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    deliver: Deliver
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    num_cached: int = 0  # leading token_ids whose KV is in the pool
    # Pool slots of token_ids[0], [1], ...: the cached ones and those being computed this step.
    slots: list[int] = field(default_factory=list)
    # The prefix cache's blocks this sequence holds (prefix_cache.py): they hold its first slots.
    cache_blocks: list = field(default_factory=list)
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache at admission
    preemptions: int = 0
    text: str = ""  # output text so far, cut at a stop string
    sent_chars: int = 0  # text[:sent_chars] has been delivered
    unsent_ids: list[int] = field(default_factory=list)
    finished: bool = False

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_ids)

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - len(self.prompt_ids)

    @property
    def num_uncached(self) -> int:
        return len(self.token_ids) - self.num_cached

    @property
    def decoding(self) -> bool:
        """Its prompt (and any recomputed output) is in the pool: one new token a step."""
        return self.num_cached > 0 and self.num_uncached == 1
