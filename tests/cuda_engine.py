"""What the engine's CUDA tests share (tests/test_engine_cuda.py, tests/test_gguf_cuda.py): the mark
that skips them where there is no GPU, kvcached or triton (CI), their prompts, and a greedy request."""

from __future__ import annotations

import pytest
import torch

from services.gpu_agent.engine import GenerationRequest
from services.gpu_agent.engine.kvcached_pool import kvcached_available


def _triton_ok() -> bool:
    try:
        from services.gpu_agent.engine.triton_decode import triton_available
    except ImportError:
        return False
    return triton_available()


needs_cuda_kvcached_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() and kvcached_available() and _triton_ok()), reason="needs CUDA, kvcached and triton"
)

PROMPTS = ["Hello world", "The cache of the model is", "1 2 3 4 5 6 7 8 9 10 11 12", "a", "x y z " * 9]


def greedy(prompt: str, max_tokens: int, request_id: str) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id, prompt=prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True
    )
