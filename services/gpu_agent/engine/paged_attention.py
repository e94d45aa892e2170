"""Attention over the paged KV pool for one engine step.

A step runs several sequences at once: decoding sequences (one new token
each) first, then prefill chunks (several new tokens each). Every new
token's key and value are written to its slot in the pool; each sequence's
queries then attend to all its slots so far, in token order.

Three paths: plain torch (gather each sequence's slots, then scaled
dot-product attention, one call per sequence; the decoding sequences of a step
in one call, padded to the longest and masked), which runs anywhere; on CUDA,
one Triton kernel for all the decoding sequences of the step
(triton_decode.py), which reads the slots in place instead of gathering them;
and on CUDA, one flash-attention varlen call for all the other sequences of
the step (a prefill step of many short prompts ran one SDPA per prompt and
layer: 2 ms per prompt on a 1B model, H100)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# enable_gqa (torch >= 2.5) lets query heads share kv heads without copying them.
_SDPA_HAS_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)
# Not cuDNN attention on CUDA: it builds a graph for every new key length, so
# decoding (one longer each step) measured 3x slower per step than flash on an H100.
_CUDA_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _causal_varlen():
    """Flash attention over a varlen batch with the causal mask aligned to the
    lower right (a query at position start + i sees keys 0..start + i; flash
    attention's causal rule when there are fewer queries than keys), query
    heads sharing KV heads, called as (q, k, v, cu_q, cu_k, max_q, max_k);
    None where this torch lacks the op. The aten op, not its public wrapper
    torch.nn.attention.varlen.varlen_attn (torch >= 2.10): the wrapper's
    custom-op and compile guards cost ~150 us a call on the host (H100, torch
    2.11, cProfile: bench/probe/prefill_overhead.py), once per layer and step."""
    try:
        flash = torch.ops.aten._flash_attention_forward
    except (AttributeError, RuntimeError):
        return None

    def attend(q, k, v, cu_q, cu_k, max_q, max_k):
        # positional: dropout_p, is_causal, return_debug_mask; [0] is the output
        return flash(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False)[0]

    return attend


_VARLEN = _causal_varlen()
_VARLEN_DTYPES = (torch.bfloat16, torch.float16)  # flash attention's


@dataclass
class VarlenSpans:
    """The torch-path spans of a step as one varlen batch: their slots back to
    back and the cumulative query and key lengths."""

    slots: torch.Tensor  # int64: every span's slots 0..start+count, span after span
    cu_q: torch.Tensor  # int32 [spans + 1]
    cu_k: torch.Tensor  # int32 [spans + 1]
    max_q: int
    max_k: int


@dataclass
class SeqSpan:
    """One sequence's new tokens in a step: they sit at positions
    [start, start + count) and attend to positions [0, start + count),
    whose KV slots are `slots` (int64, on the device)."""

    start: int
    count: int
    slots: torch.Tensor


@dataclass
class StepAttention:
    """What attention needs for one step, built once and used by every layer."""

    slot_mapping: torch.Tensor  # [new tokens] int64: where each new token's K/V goes
    spans: list[SeqSpan]  # decoding spans (count 1) first, then prefill chunks
    num_decode: int  # how many leading spans are decoding
    # For the Triton decode kernel, when it is used: [num_decode, longest] int32 slots and their lengths.
    decode_slot_table: torch.Tensor | None = None
    decode_seq_lens: torch.Tensor | None = None
    # The torch-path spans for one varlen call (CUDA, where torch has it); None: one SDPA call per span.
    varlen: VarlenSpans | None = None
    # Elsewhere (the CPU), the decoding spans in one SDPA call: [num_decode, longest] int64 slots, each
    # row padded with its own first slot, and [num_decode, 1, 1, longest] bool, True where a key is real.
    decode_batch: tuple[torch.Tensor, torch.Tensor] | None = None

    def sdpa_context(self, device: torch.device):
        return sdpa_kernel(_CUDA_SDPA_BACKENDS) if device.type == "cuda" else contextlib.nullcontext()


def build_step_attention(
    spans: list[tuple[int, int, list[int]]],
    num_decode: int,
    device: torch.device,
    decode_table: torch.Tensor | None = None,
    decode_rows: list[int] | None = None,
    dtype: torch.dtype | None = None,
) -> StepAttention:
    """spans: (start, count, slots of positions 0..start+count) per sequence,
    decoding ones first. With decode_table (the slots of every decoding
    sequence, one row each: slot_table.py) and the decoding spans' rows in it,
    the decoding spans go to the Triton kernel; the rest to the torch path,
    as one varlen call on CUDA where torch has it and `dtype` (the KV's) is
    one flash attention takes. Each index tensor is built from host lists and
    moved to the device in one transfer."""
    new_slots = [slot for start, count, slots in spans for slot in slots[start : start + count]]
    step = StepAttention(_to_device(new_slots, torch.int64, device), [], num_decode)
    varlen_here = _VARLEN is not None and device.type == "cuda" and dtype in _VARLEN_DTYPES
    torch_from = 0
    if decode_table is not None and num_decode:
        if decode_rows is None:
            raise ValueError("a decode table needs the decoding spans' rows in it")
        torch_from = num_decode
        lengths = [start + 1 for start, _, _ in spans[:num_decode]]
        width = -(-max(lengths) // 64) * 64  # fewer distinct shapes than the exact longest
        rows = _to_device(decode_rows, torch.int64, device)
        step.decode_slot_table = decode_table.index_select(0, rows)[:, :width]
        step.decode_seq_lens = _to_device(lengths, torch.int32, device)
    elif num_decode > 1 and not varlen_here:
        torch_from = num_decode
        step.decode_batch = _padded_decode_batch(spans[:num_decode], device)
    # Every other span's slots in one tensor; each span takes a slice of it.
    flat = [slot for start, count, slots in spans[torch_from:] for slot in slots[: start + count]]
    all_slots = _to_device(flat, torch.int64, device)
    offset = 0
    for start, count, _ in spans:
        if len(step.spans) < torch_from:  # served by the kernel or the padded batch: no gather here
            step.spans.append(SeqSpan(start, count, all_slots[:0]))
            continue
        step.spans.append(SeqSpan(start, count, all_slots[offset : offset + start + count]))
        offset += start + count
    rest = spans[torch_from:]
    if rest and varlen_here:
        cu_q, cu_k = [0], [0]
        for start, count, _ in rest:
            cu_q.append(cu_q[-1] + count)
            cu_k.append(cu_k[-1] + start + count)
        step.varlen = VarlenSpans(
            all_slots,
            _to_device(cu_q, torch.int32, device),
            _to_device(cu_k, torch.int32, device),
            max(count for _, count, _ in rest),
            max(start + count for start, count, _ in rest),
        )
    return step


def _padded_decode_batch(
    spans: list[tuple[int, int, list[int]]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoding spans' slots as one [n, longest] table and its mask (StepAttention.decode_batch): on the
    CPU one SDPA over the batch took a 16-sequence decode step of SmolLM2-135M's attention from 37 ms (one
    call per sequence and layer) to a few."""
    longest = max(start + 1 for start, _, _ in spans)
    rows = [slots[: start + 1] + [slots[0]] * (longest - start - 1) for start, _, slots in spans]
    lengths = torch.tensor([start + 1 for start, _, _ in spans])
    mask = (torch.arange(longest) < lengths[:, None])[:, None, None, :]
    return _to_device(rows, torch.int64, device), mask.to(device)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def write_kv(
    k_buffer: torch.Tensor, v_buffer: torch.Tensor, step: StepAttention, k: torch.Tensor, v: torch.Tensor
) -> None:
    """k, v: [new tokens, kv_heads, head_dim] into their slots."""
    k_buffer[step.slot_mapping] = k
    v_buffer[step.slot_mapping] = v


def paged_attention(
    q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, step: StepAttention
) -> torch.Tensor:
    """q: [new tokens, heads, head_dim], in the order of step.spans. Returns the same shape."""
    first_prefill = 0
    if step.decode_slot_table is not None and step.decode_seq_lens is not None:  # set together
        from services.gpu_agent.engine.triton_decode import paged_decode_attention

        first_prefill = step.num_decode
        decoded = paged_decode_attention(
            q[:first_prefill], k_buffer, v_buffer, step.decode_slot_table, step.decode_seq_lens, q.shape[-1] ** -0.5
        )
        if first_prefill == q.shape[0]:
            return decoded  # a pure decode step: no copy into a joint output
    elif step.decode_batch is not None:
        first_prefill = step.num_decode
        decoded = _attend_decode_batch(q[:first_prefill], k_buffer, v_buffer, *step.decode_batch)
        if first_prefill == q.shape[0]:
            return decoded
    if step.varlen is not None:
        batch = step.varlen
        rest = _VARLEN(
            q[first_prefill:],
            k_buffer[batch.slots],
            v_buffer[batch.slots],
            batch.cu_q,
            batch.cu_k,
            batch.max_q,
            batch.max_k,
        )
        return torch.cat([decoded, rest]) if first_prefill else rest
    out = torch.empty_like(q)
    if first_prefill:
        out[:first_prefill] = decoded
    offset = first_prefill
    for span in step.spans[first_prefill:]:
        end = offset + span.count
        out[offset:end] = _attend_span(q[offset:end], k_buffer, v_buffer, span)
        offset = end
    return out


def _attend_decode_batch(
    q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, slots: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """q: [n, heads, head_dim], one new token for each of n decoding sequences -> the same shape, in one
    SDPA call over their keys padded to the longest (masked)."""
    keys = k_buffer[slots].transpose(1, 2)  # [n, kv_heads, longest, head_dim]
    values = v_buffer[slots].transpose(1, 2)
    query = q.unsqueeze(2)  # [n, heads, 1, head_dim]
    keys, values, gqa = _grouped(query, keys, values)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, **gqa)[:, :, 0]


def _grouped(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor):
    """Query heads sharing KV heads: SDPA's enable_gqa where torch has it, else the KV heads repeated."""
    group = query.shape[1] // keys.shape[1]
    if group == 1:
        return keys, values, {}
    if _SDPA_HAS_GQA:
        return keys, values, {"enable_gqa": True}
    return keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1), {}


def _attend_span(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, span: SeqSpan) -> torch.Tensor:
    """q: [count, heads, head_dim] -> [count, heads, head_dim], with torch's SDPA."""
    # [1, kv_heads, tokens, head_dim]: 4-D, so CUDA can pick its fused kernels.
    keys = k_buffer[span.slots].transpose(0, 1).unsqueeze(0)
    values = v_buffer[span.slots].transpose(0, 1).unsqueeze(0)
    query = q.transpose(0, 1).unsqueeze(0)
    keys, values, gqa = _grouped(query, keys, values)
    if span.count == 1:
        out = F.scaled_dot_product_attention(query, keys, values, **gqa)
    elif span.start == 0:
        out = F.scaled_dot_product_attention(query, keys, values, is_causal=True, **gqa)
    else:
        # A later chunk: new token i sits at position start + i and sees keys 0..start + i, the causal
        # mask aligned to the lower right. As a CausalBias SDPA keeps its flash kernel on CUDA; an
        # explicit boolean mask sent chunked prefill to a slower kernel (bench/probe/prefill_chunks.py).
        # Imported here: torch.nn.attention.bias imports torch's compile stack (and triton, where installed).
        from torch.nn.attention.bias import causal_lower_right

        out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=causal_lower_right(span.count, span.start + span.count), **gqa
        )
    return out[0].transpose(0, 1)
