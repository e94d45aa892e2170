"""The torch attention path over the paged pool (CPU): the decoding sequences of a step in one padded,
masked SDPA call give what one call per sequence gives."""

from __future__ import annotations

import torch

from services.gpu_agent.engine.paged_attention import build_step_attention, paged_attention


def test_a_steps_decoding_sequences_in_one_masked_call_match_one_call_each():
    torch.manual_seed(0)
    heads, kv_heads, dim, capacity = 6, 2, 16, 256
    k_buffer, v_buffer = torch.randn(capacity, kv_heads, dim), torch.randn(capacity, kv_heads, dim)
    slots = torch.randperm(capacity).tolist()
    # Three decoding sequences of 5, 40 and 1 tokens, then a prefill chunk of 4 tokens after 10.
    lengths = (5, 40, 1)
    spans, taken = [], 0
    for n in lengths:
        spans.append((n - 1, 1, slots[taken : taken + n]))
        taken += n
    spans.append((10, 4, slots[taken : taken + 14]))
    q = torch.randn(len(lengths) + 4, heads, dim)
    batched = build_step_attention(spans, len(lengths), torch.device("cpu"))
    assert batched.decode_batch is not None and batched.decode_batch[0].shape == (3, 40)
    # One call each: every sequence in a step of its own (a lone decoding sequence keeps its own call).
    cpu = torch.device("cpu")
    one_each = [
        paged_attention(q[i : i + 1], k_buffer, v_buffer, build_step_attention([span], 1, cpu))
        for i, span in enumerate(spans[: len(lengths)])
    ]
    one_each.append(paged_attention(q[len(lengths) :], k_buffer, v_buffer, build_step_attention(spans[-1:], 0, cpu)))
    assert torch.allclose(paged_attention(q, k_buffer, v_buffer, batched), torch.cat(one_each), atol=1e-5)
    alone = build_step_attention(spans[:1], 1, torch.device("cpu"))
    assert alone.decode_batch is None  # one sequence keeps its own call
