"""Probe: what chunked prefill costs in the built-in engine, and whether the
lower-right causal bias keeps SDPA on its fast kernel.

1. One later chunk's attention (Llama-3.2-3B geometry: 24 query heads, 8 KV
   heads, head_dim 128, bf16): an explicit boolean mask (the old path) against
   causal_lower_right (the new one): largest difference, time per call.
2. The 3B dummy-weight engine: time to the first token of one prompt of 1536
   and of 3072 tokens under step budgets of 512 to 4096 tokens, and at 512
   with the old masked attention patched back in.

    python bench/probe/prefill_chunks.py [--device cuda]"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from decode_throughput import build_engine, first_token_s, model_folder, prompt_of_length  # noqa: E402
from torch.nn.attention.bias import causal_lower_right  # noqa: E402

from services.gpu_agent.engine import paged_attention  # noqa: E402


def masked_sdpa(query, keys, values, start, count, **gqa):
    key_pos = torch.arange(start + count, device=query.device)
    query_pos = torch.arange(start, start + count, device=query.device)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=key_pos[None, :] <= query_pos[:, None], **gqa)


def biased_sdpa(query, keys, values, start, count, **gqa):
    if start == 0:  # the engine's first chunk: plain causal
        return F.scaled_dot_product_attention(query, keys, values, is_causal=True, **gqa)
    return F.scaled_dot_product_attention(
        query, keys, values, attn_mask=causal_lower_right(count, start + count), **gqa
    )


def time_call(fn, repeats: int = 50) -> float:
    fn()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    return (time.perf_counter() - start) / repeats


def kernel_probe(device: str) -> None:
    print("one chunk's attention, 3B geometry (ms per call, per layer)")
    print(f"{'start':>6} {'count':>6} {'masked':>8} {'bias':>8} {'max diff':>9}")
    for start, count in ((0, 512), (0, 3072), (512, 512), (1024, 512), (2048, 2048), (3584, 512)):
        q = torch.randn(1, 24, count, 128, dtype=torch.bfloat16, device=device)
        k = torch.randn(1, 8, start + count, 128, dtype=torch.bfloat16, device=device)
        v = torch.randn(1, 8, start + count, 128, dtype=torch.bfloat16, device=device)
        with paged_attention.StepAttention(None, [], 0).sdpa_context(torch.device(device)):
            a = masked_sdpa(q, k, v, start, count, enable_gqa=True)
            b = biased_sdpa(q, k, v, start, count, enable_gqa=True)
            ms_a = 1e3 * time_call(lambda: masked_sdpa(q, k, v, start, count, enable_gqa=True))
            ms_b = 1e3 * time_call(lambda: biased_sdpa(q, k, v, start, count, enable_gqa=True))
        print(f"{start:>6} {count:>6} {ms_a:>8.3f} {ms_b:>8.3f} {(a.float() - b.float()).abs().max().item():>9.4f}")


def old_attend_span(q, k_buffer, v_buffer, span):
    keys = k_buffer[span.slots].transpose(0, 1).unsqueeze(0)
    values = v_buffer[span.slots].transpose(0, 1).unsqueeze(0)
    query = q.transpose(0, 1).unsqueeze(0)
    gqa = {"enable_gqa": True} if q.shape[1] != keys.shape[1] else {}
    if span.count == 1:
        out = F.scaled_dot_product_attention(query, keys, values, **gqa)
    elif span.start == 0:
        out = F.scaled_dot_product_attention(query, keys, values, is_causal=True, **gqa)
    else:
        out = masked_sdpa(query, keys, values, span.start, span.count, **gqa)
    return out[0].transpose(0, 1)


async def engine_probe(device: str) -> None:
    engine = build_engine(model_folder("llama-3.2-3b"), "auto", device, max_batch=1, prompt_tokens=3072, new_tokens=1)
    prompts = {n: prompt_of_length(engine, n) for n in (1536, 3072)}
    new_attend = paged_attention._attend_span
    print("\n3B engine: time to first token of one prompt (ms, best of 3)")
    print(f"{'budget':>7} {'attention':>10} {'1536':>8} {'3072':>8}")
    for budget, attend in (
        (512, old_attend_span),
        (512, new_attend),
        (1024, new_attend),
        (2048, new_attend),
        (4096, new_attend),
    ):
        paged_attention._attend_span = attend
        engine._batcher.step_tokens = budget  # a probe: the engine is built with one budget
        row = []
        for n, prompt in prompts.items():
            await first_token_s(engine, prompt, f"warm-{budget}-{n}")
            row.append(min([await first_token_s(engine, prompt, f"p-{budget}-{n}-{i}") for i in range(3)]))
        label = "masked" if attend is old_attend_span else "bias"
        print(f"{budget:>7} {label:>10} {1e3 * row[0]:>8.1f} {1e3 * row[1]:>8.1f}")
    paged_attention._attend_span = new_attend
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    engine_module = sys.modules["services.gpu_agent.engine.engine"]
    engine_module.STEP_LOG = True
    for budget in (512, 4096):
        engine._batcher.step_tokens = budget
        print(f"\nsteps of the 3072-token prompt at a budget of {budget}", flush=True)
        ms = 1e3 * await first_token_s(engine, prompts[3072], f"logged-{budget}")
        print(f"{ms:.1f} ms to the first token", flush=True)
    engine_module.STEP_LOG = False

    engine.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    kernel_probe(args.device)
    asyncio.run(engine_probe(args.device))


if __name__ == "__main__":
    main()
