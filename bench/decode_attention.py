"""Decode attention: the Triton kernel against the torch path, on one GPU.

Llama-3.1-8B's attention (32 query heads, 8 kv heads, head_dim 128, bf16), one
layer, every sequence of a batch at the same context length, its KV rows at
randomly permuted slots of a pool-like buffer. For each batch size and context
(one layer's KV is 4 KiB a token, at most 4 GiB here; a combination over 8 GiB
would be skipped) it times, with CUDA events (warm-up, then the median of
--iters calls, L2 flushed before each):
  torch   the torch path: gather the slots' rows (slot_table) into a dense
          [B, L, KVH, D] copy, viewed as [B, KVH, L, D], then
          scaled_dot_product_attention with enable_gqa and a padding mask,
          under the SDPA backends the engine allows;
  triton  paged_decode_attention (services/gpu_agent/engine/triton_decode.py),
          which reads the slots in place, with its automatic split count;
and checks the two outputs agree. KV GB/s is the KV bytes the sequences hold
(all read once) over the Triton time. Unless --no-sweep, it also times every
split count in SPLITS and reports the fastest, to tune the automatic choice.

    python bench/decode_attention.py [--json out.json] [--iters 30] [--no-sweep]"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common`, also when imported from elsewhere
import common  # noqa: F401  (first: puts the project on sys.path)
import torch
import torch.nn.functional as F
from common import environment, table, write_json
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, KV_HEADS, HEAD_DIM, DTYPE = 32, 8, 128, torch.bfloat16
BATCHES = [1, 8, 32, 64]
CONTEXTS = [512, 4096, 16384]
MAX_KV_BYTES = 8 << 30
SPLITS = [1, 2, 4, 8, 16, 32, 64]
# As the engine's torch path (paged_attention.py): no cuDNN attention, which
# builds a graph for every new key length.
SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
TOLERANCE = 2e-2  # bf16 inputs, float32 accumulation in both paths
L2_FLUSH_BYTES = 256 << 20  # several times an H100's 50 MB L2


def kv_bytes(batch: int, context: int) -> int:
    """Keys and values of all the batch's tokens: what one decode step must read."""
    return 2 * batch * context * KV_HEADS * HEAD_DIM * DTYPE.itemsize


def make_inputs(batch: int, context: int, gen: torch.Generator) -> dict:
    """One layer's K/V buffers with exactly the batch's rows, each sequence's
    tokens at slots scattered by a random permutation (int32 table, as the engine
    builds it)."""
    rows = batch * context
    device = torch.device("cuda")
    slot_table = torch.randperm(rows, generator=gen, device=device).view(batch, context).to(torch.int32)
    return {
        "q": torch.randn(batch, HEADS, HEAD_DIM, generator=gen, device=device).to(DTYPE),
        "k_buffer": torch.randn(rows, KV_HEADS, HEAD_DIM, generator=gen, device=device, dtype=DTYPE),
        "v_buffer": torch.randn(rows, KV_HEADS, HEAD_DIM, generator=gen, device=device, dtype=DTYPE),
        "slot_table": slot_table,
        "seq_lens": torch.full((batch,), context, dtype=torch.int32, device=device),
    }


def torch_decode(q, k_buffer, v_buffer, slot_table, seq_lens, scale: float) -> torch.Tensor:
    """The baseline: gather, then SDPA over [B, KVH, L, D] with a padding mask."""
    index = slot_table.long()
    keys = k_buffer[index].transpose(1, 2)  # [B, L, KVH, D] gathered, viewed as [B, KVH, L, D]
    values = v_buffer[index].transpose(1, 2)
    positions = torch.arange(slot_table.shape[1], device=q.device)
    mask = (positions[None, :] < seq_lens[:, None])[:, None, None, :]  # [B, 1, 1, L]
    with sdpa_kernel(SDPA_BACKENDS):
        out = F.scaled_dot_product_attention(
            q[:, :, None, :], keys, values, attn_mask=mask, scale=scale, enable_gqa=True
        )
    return out[:, :, 0, :]


def time_ms(fn, iters: int, warmup: int = 5) -> float:
    """Median milliseconds of one call, each call timed by its own CUDA events and
    preceded by an L2 flush, so the KV comes from HBM as it would in a real step
    (other layers' KV evicts it)."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    for _ in range(warmup):
        fn()
    events = []
    for _ in range(iters):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def bench_one(batch: int, context: int, iters: int, sweep: bool, gen: torch.Generator) -> dict:
    from services.gpu_agent.engine import triton_decode

    inputs = make_inputs(batch, context, gen)
    scale = HEAD_DIM**-0.5
    row = {"batch": batch, "context": context, "kv_mib": kv_bytes(batch, context) / 2**20}

    expected = torch_decode(**inputs, scale=scale)
    got = triton_decode.paged_decode_attention(**inputs, scale=scale)
    row["max_abs_err"] = (got.float() - expected.float()).abs().max().item()
    row["agree"] = row["max_abs_err"] <= TOLERANCE
    del expected, got

    programs = batch * KV_HEADS  # one program per (sequence, kv head): the whole GQA group fits one
    row["auto_splits"] = triton_decode._split_tokens(
        context, triton_decode._auto_num_splits(programs, context, torch.device("cuda")), 64
    )[1]
    row["torch_ms"] = time_ms(lambda: torch_decode(**inputs, scale=scale), iters)
    row["triton_ms"] = time_ms(lambda: triton_decode.paged_decode_attention(**inputs, scale=scale), iters)
    row["speedup"] = row["torch_ms"] / row["triton_ms"]
    row["triton_gbps"] = kv_bytes(batch, context) / (row["triton_ms"] * 1e-3) / 1e9
    row["torch_gbps"] = kv_bytes(batch, context) / (row["torch_ms"] * 1e-3) / 1e9

    if sweep:
        # Forced split counts (rounded to whole 64-token blocks, so some repeat).
        row["sweep_ms"] = {}
        for splits in SPLITS:
            launched = triton_decode._split_tokens(context, splits, 64)[1]
            if str(launched) not in row["sweep_ms"]:
                row["sweep_ms"][str(launched)] = time_ms(
                    lambda n=splits: triton_decode.paged_decode_attention(**inputs, scale=scale, num_splits=n), iters
                )
        best = min(row["sweep_ms"], key=row["sweep_ms"].get)
        row["best_splits"], row["best_ms"] = int(best), row["sweep_ms"][best]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--iters", type=int, default=30, help="timed calls per measurement (median)")
    parser.add_argument("--no-sweep", action="store_true", help="skip timing every split count")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        raise SystemExit("decode_attention.py needs a CUDA GPU")
    from services.gpu_agent.engine.triton_decode import triton_available

    if not triton_available():
        raise SystemExit("decode_attention.py needs triton")

    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for context in CONTEXTS:
        for batch in BATCHES:
            if kv_bytes(batch, context) > MAX_KV_BYTES:
                print(f"skip batch {batch} context {context}: {kv_bytes(batch, context) / 2**30:.0f} GiB of KV")
                continue
            rows.append(bench_one(batch, context, args.iters, not args.no_sweep, gen))
            torch.cuda.empty_cache()
            print(
                f"batch {batch:3d} context {context:6d}: torch {rows[-1]['torch_ms']:.3f} ms, "
                f"triton {rows[-1]['triton_ms']:.3f} ms",
                flush=True,
            )

    print(
        f"\n{torch.cuda.get_device_name(0)}: {HEADS} heads, {KV_HEADS} kv heads, head_dim {HEAD_DIM}, "
        f"{str(DTYPE).removeprefix('torch.')}, one layer; median of {args.iters}"
    )
    columns = [
        ("batch", "batch", "d"),
        ("context", "context", "d"),
        ("kv_mib", "KV MiB", ".0f"),
        ("torch_ms", "torch ms", ".3f"),
        ("triton_ms", "triton ms", ".3f"),
        ("speedup", "speed-up", ".2f"),
        ("triton_gbps", "KV GB/s", ".0f"),
        ("auto_splits", "splits", "d"),
    ]
    if not args.no_sweep:
        columns += [("best_splits", "best splits", "d"), ("best_ms", "best ms", ".3f")]
    columns += [("max_abs_err", "max err", ".1e"), ("agree", "agree", "")]
    print(table(rows, columns))
    write_json(
        args.json,
        {
            "benchmark": "decode_attention",
            "environment": environment(),
            "geometry": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "dtype": str(DTYPE)},
            "iters": args.iters,
            "results": rows,
        },
    )
    if not all(row["agree"] for row in rows):
        raise SystemExit("the Triton and torch outputs disagree (see max err)")


if __name__ == "__main__":
    main()
