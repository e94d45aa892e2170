"""The varlen attention path (one flash-attention call for every prefill span
of a step, CUDA) against the per-span SDPA path it replaces there. Skipped
where there is no GPU or this torch has no flash attention op (CI); run on the GPU
host."""

from __future__ import annotations

import pytest
import torch

from services.gpu_agent.engine import paged_attention as pa

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and pa._VARLEN is not None), reason="needs CUDA and torch's flash attention op"
)

# (start, count): fresh prompts, later chunks of a long prompt, one-token spans (decoding on the torch path)
SPANS = [(0, 128), (0, 7), (512, 256), (0, 1), (300, 1), (1000, 48), (0, 2048)]


@pytest.mark.parametrize("heads,kv_heads", [(32, 8), (8, 8)])
def test_one_varlen_call_gives_what_one_sdpa_call_per_span_gives(heads, kv_heads):
    gen = torch.Generator().manual_seed(0)
    head_dim, pool_slots, device = 64, 8192, torch.device("cuda")
    k_buffer = torch.randn(pool_slots, kv_heads, head_dim, generator=gen).to(device, torch.bfloat16)
    v_buffer = torch.randn(pool_slots, kv_heads, head_dim, generator=gen).to(device, torch.bfloat16)
    perm = torch.randperm(pool_slots, generator=gen).tolist()  # slots scattered over the pool, as pages are
    spans, used = [], 0
    for start, count in SPANS:
        spans.append((start, count, perm[used : used + start + count]))
        used += start + count
    q = torch.randn(sum(c for _, c in SPANS), heads, head_dim, generator=gen).to(device, torch.bfloat16)

    step = pa.build_step_attention(spans, 0, device, dtype=torch.bfloat16)
    assert step.varlen is not None and step.varlen.max_k == 2048
    with step.sdpa_context(device):
        varlen = pa.paged_attention(q, k_buffer, v_buffer, step)
        step.varlen = None
        per_span = pa.paged_attention(q, k_buffer, v_buffer, step)
    assert varlen.shape == per_span.shape
    torch.testing.assert_close(varlen.float(), per_span.float(), atol=2e-2, rtol=2e-2)


def test_kv_in_float32_keeps_the_per_span_path():
    step = pa.build_step_attention([(0, 4, [0, 1, 2, 3])], 0, torch.device("cuda"), dtype=torch.float32)
    assert step.varlen is None
