"""Decode attention over the paged KV pool, as Triton kernels.

One decoding step gives every sequence one new query token, which attends to
all the sequence's keys and values so far. Those sit in the pool's per-layer
buffers ([slots, kv_heads, head_dim]) at the slots named by the sequence's row
of a slot table. The kernels read them in place, by slot, instead of gathering
them into a contiguous copy first as the torch path does.

Design ("flash-decoding", split-K):
  stage 1, `_attend_split_kernel`: one program per (sequence, kv head, split).
    A split is a contiguous range of the sequence's tokens. The program loads
    the queries of every query head that shares the kv head (the GQA group), so
    each key and value row is read once per group, and runs an online softmax
    over its range: it keeps a running max, the sum of exponentials and the
    weighted sum of values, and writes those (max, sum, acc) to float32 scratch.
  stage 2, `_combine_splits_kernel`: one program per (sequence, query head)
    rescales the splits' partials to a common max and divides.
  With one split there is nothing to combine: stage 1 normalizes and writes
  the output itself, saving a launch.
Splitting the tokens is what fills the GPU when there are few sequences
(batch x kv heads programs alone would leave most SMs idle) and the contexts
are long; `_auto_num_splits` picks the count.

Memory safety: the pool's buffers are views into a large virtual reservation
(kvcached) in which only slots in use are backed by physical memory. The
kernels read only rows named by slot_table[b, :seq_lens[b]]: every key/value
load is masked by the token's position, so padding entries of the slot table
(whatever their value) are never dereferenced.

triton is imported here guarded: the engine imports this module only on CUDA,
and the module still imports (with triton_available() False) where triton is
missing."""

from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl

    _TRITON_IMPORTED = True
except Exception:  # noqa: BLE001  ImportError, or a broken install: the engine falls back to torch
    _TRITON_IMPORTED = False

    class _NoTriton:
        """Stands in for triton and triton.language when triton is missing, so the
        kernel definitions below still execute (as plain, never-called functions)."""

        constexpr = object

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _NoTriton()

_LOG2_E = 1.4426950408889634  # scores are kept in base 2, so the kernels can use exp2
_MAX_HEAD_DIM = 256  # larger head dims would need the key/value tiles split along head_dim
_MAX_SPLITS = 64  # the combine kernel holds every split's partial of one head in registers
_MIN_TOKENS_PER_SPLIT = 128  # below this a split's fixed costs (queries, partials) stop paying
# Tables up to this wide get one split: the second (combine) kernel costs more
# than the split saves there, and a small model's decode step is mostly launches.
_SINGLE_SPLIT_MAX_LEN = 1024
_PROGRAMS_PER_SM = 4  # stage-1 programs wanted per SM: several resident at once hide load latency
_CPU_SM_COUNT = 8  # stands in for the SM count under the CPU interpreter (tests)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_available() -> bool:
    """True when triton imports and CUDA is available. Never raises."""
    try:
        return _TRITON_IMPORTED and torch.cuda.is_available()
    except Exception:  # noqa: BLE001  a broken CUDA setup means "not available", not an error
        return False


# ---- stage 1: attention over one split of one sequence's tokens ------------------------


@triton.jit
def _attend_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    slot_table_ptr,
    seq_lens_ptr,
    out_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_acc_ptr,
    qk_scale,  # softmax scale * log2(e)
    max_len,  # the slot table's width: a bound on every sequence's length
    tokens_per_split,
    num_heads,
    group_size,
    head_blocks_per_group,
    head_dim,
    num_splits,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_tb,
    stride_tn,
    stride_ob,
    stride_oh,
    stride_od,
    BLOCK_G: tl.constexpr,  # query heads per program (the GQA group, padded to tl.dot's minimum of 16)
    BLOCK_N: tl.constexpr,  # tokens per loop iteration
    BLOCK_D: tl.constexpr,  # head_dim padded to a power of two
    SINGLE_SPLIT: tl.constexpr,  # write the normalized output directly: no combine stage
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 inputs (no TF32 rounding), else the default
):
    batch = tl.program_id(0)
    head_block = tl.program_id(1)
    split = tl.program_id(2)

    # min(): never read past the slot table's row, even if a length is wrong.
    seq_len = tl.minimum(tl.load(seq_lens_ptr + batch), max_len)
    start = split * tokens_per_split
    if start >= seq_len:
        # The split lies past this sequence's end (a shorter sequence of a ragged
        # batch): nothing to read. The combine stage knows to skip it.
        return
    end = tl.minimum(start + tokens_per_split, seq_len)

    # The query heads of this program: a block of the group that shares `kv_head`.
    kv_head = head_block // head_blocks_per_group
    group_idx = (head_block % head_blocks_per_group) * BLOCK_G + tl.arange(0, BLOCK_G)
    head_mask = group_idx < group_size
    heads = kv_head * group_size + group_idx
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim

    # Padding rows (heads past the group) and columns (dims past head_dim) load as
    # zeros: they add nothing to the dot products and are never stored.
    q = tl.load(
        q_ptr + batch * stride_qb + heads[:, None] * stride_qh + dims[None, :] * stride_qd,
        mask=head_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )

    running_max = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    k_head_ptr = k_ptr + kv_head * stride_kh
    v_head_ptr = v_ptr + kv_head * stride_vh
    table_row_ptr = slot_table_ptr + batch * stride_tb

    for block_start in range(start, end, BLOCK_N):
        tokens = block_start + tl.arange(0, BLOCK_N)
        token_mask = tokens < end
        # int64: slot * stride can pass 2**31 elements in a large virtual reservation.
        slots = tl.load(table_row_ptr + tokens * stride_tn, mask=token_mask, other=0).to(tl.int64)

        # Keys as [BLOCK_D, BLOCK_N], ready for q @ k. Masked lanes (tokens past
        # `end`) are not dereferenced, whatever slot the padding names.
        keys = tl.load(
            k_head_ptr + slots[None, :] * stride_ks + dims[:, None] * stride_kd,
            mask=dim_mask[:, None] & token_mask[None, :],
            other=0.0,
        )
        scores = tl.dot(q, keys, input_precision=DOT_PRECISION) * qk_scale
        scores = tl.where(token_mask[None, :], scores, float("-inf"))

        # Online softmax: rescale what was accumulated so far to the new max.
        # Every block has at least one valid token, so new_max is finite.
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        rescale = tl.exp2(running_max - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(probs, 1)

        values = tl.load(
            v_head_ptr + slots[:, None] * stride_vs + dims[None, :] * stride_vd,
            mask=token_mask[:, None] & dim_mask[None, :],
            other=0.0,
        )
        acc = acc * rescale[:, None] + tl.dot(probs.to(values.dtype), values, input_precision=DOT_PRECISION)
        running_max = new_max

    store_mask = head_mask[:, None] & dim_mask[None, :]
    if SINGLE_SPLIT:
        out = acc / running_sum[:, None]
        tl.store(
            out_ptr + batch * stride_ob + heads[:, None] * stride_oh + dims[None, :] * stride_od,
            out.to(out_ptr.dtype.element_ty),
            mask=store_mask,
        )
    else:
        # Scratch is contiguous: max and sum are [batch, heads, splits], acc [batch, heads, splits, head_dim].
        partial = ((batch * num_heads + heads) * num_splits + split).to(tl.int64)
        tl.store(part_max_ptr + partial, running_max, mask=head_mask)
        tl.store(part_sum_ptr + partial, running_sum, mask=head_mask)
        tl.store(part_acc_ptr + partial[:, None] * head_dim + dims[None, :], acc, mask=store_mask)


# ---- stage 2: combine the splits of one (sequence, query head) ----------------------------


@triton.jit
def _combine_splits_kernel(
    part_max_ptr,
    part_sum_ptr,
    part_acc_ptr,
    seq_lens_ptr,
    out_ptr,
    max_len,
    tokens_per_split,
    num_heads,
    head_dim,
    num_splits,
    stride_ob,
    stride_oh,
    stride_od,
    BLOCK_S: tl.constexpr,  # num_splits padded to a power of two
    BLOCK_D: tl.constexpr,
):
    batch = tl.program_id(0)
    head = tl.program_id(1)

    # Only the splits that stage 1 wrote (those that hold at least one token);
    # the rest of the scratch is uninitialized and never loaded.
    seq_len = tl.minimum(tl.load(seq_lens_ptr + batch), max_len)
    written = tl.cdiv(seq_len, tokens_per_split)
    splits = tl.arange(0, BLOCK_S)
    split_mask = splits < written
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < head_dim

    partial = ((batch * num_heads + head) * num_splits + splits).to(tl.int64)
    maxes = tl.load(part_max_ptr + partial, mask=split_mask, other=float("-inf"))
    sums = tl.load(part_sum_ptr + partial, mask=split_mask, other=0.0)
    accs = tl.load(
        part_acc_ptr + partial[:, None] * head_dim + dims[None, :],
        mask=split_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )

    # Bring every split to the common max; unwritten splits weigh exp2(-inf) = 0.
    overall_max = tl.max(maxes, 0)
    weights = tl.exp2(maxes - overall_max)
    total = tl.sum(weights * sums, 0)
    out = tl.sum(accs * weights[:, None], 0) / total
    tl.store(
        out_ptr + batch * stride_ob + head * stride_oh + dims * stride_od,
        out.to(out_ptr.dtype.element_ty),
        mask=dim_mask,
    )


# ---- host side ----------------------------------------------------------------------------


def paged_decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    slot_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """q: [B, H, D] (float16, bfloat16 or float32), one new query token per sequence.
    k_buffer, v_buffer: [S, KVH, D], q's dtype: one layer's key/value buffers of the
      KV pool; token slot s holds k_buffer[s]. Any strides (passed to the kernel).
      Only rows named by slot_table[b, :seq_lens[b]] are read.
    slot_table: int32 (or int64) [B, max_len]: row b's first seq_lens[b] entries are
      the slots of sequence b's tokens in order; the rest of the row is padding.
    seq_lens: int32 [B], each >= 1 (a row of length 0 gives undefined output).
    GQA: query head h uses kv head h // (H // KVH). D: any size up to 256
      (padded to a power of two inside, with masks).
    num_splits: how many ranges each sequence's tokens are split into (stage 1
      parallelism); default chosen from the batch, heads, max_len and SM count.
      It is an upper bound: splits are whole multiples of the kernel's token block.
    Returns [B, H, D] in q's dtype: softmax(q . K^T * scale) . V per (b, h),
    accumulated in float32. Launches asynchronously; reads nothing back to the host."""
    if not _TRITON_IMPORTED:
        raise RuntimeError("paged_decode_attention needs triton, which is not installed")
    _check_inputs(q, k_buffer, v_buffer, slot_table, seq_lens)
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    out = torch.empty((batch, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    seq_lens = seq_lens.contiguous()
    max_len = slot_table.shape[1]

    group_size = num_heads // num_kv_heads
    block_d = max(16, _next_power_of_2(head_dim))
    block_g, block_n, num_warps = _stage1_config(group_size, block_d, q.dtype)
    head_blocks_per_group = _cdiv(group_size, block_g)

    programs = batch * num_kv_heads * head_blocks_per_group
    wanted = num_splits if num_splits is not None else _auto_num_splits(programs, max_len, q.device)
    tokens_per_split, splits = _split_tokens(max_len, wanted, block_n)

    part_max = part_sum = part_acc = out  # unused placeholders when there is a single split
    if splits > 1:
        part_max = torch.empty((batch, num_heads, splits), dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
        part_acc = torch.empty((batch, num_heads, splits, head_dim), dtype=torch.float32, device=q.device)

    _attend_split_kernel[(batch, num_kv_heads * head_blocks_per_group, splits)](
        q,
        k_buffer,
        v_buffer,
        slot_table,
        seq_lens,
        out,
        part_max,
        part_sum,
        part_acc,
        float(scale) * _LOG2_E,
        max_len,
        tokens_per_split,
        num_heads,
        group_size,
        head_blocks_per_group,
        head_dim,
        splits,
        *q.stride(),
        *k_buffer.stride(),
        *v_buffer.stride(),
        *slot_table.stride(),
        *out.stride(),
        BLOCK_G=block_g,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        SINGLE_SPLIT=splits == 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=2,  # 2 stages: the next block's loads overlap this one's math
    )
    if splits > 1:
        block_s = _next_power_of_2(splits)
        _combine_splits_kernel[(batch, num_heads)](
            part_max,
            part_sum,
            part_acc,
            seq_lens,
            out,
            max_len,
            tokens_per_split,
            num_heads,
            head_dim,
            splits,
            *out.stride(),
            BLOCK_S=block_s,
            BLOCK_D=block_d,
            num_warps=8 if block_s * block_d >= 8192 else 4,
        )
    return out


def compile_decode_variants(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    batches: list[int],
    widths: list[int],
) -> None:
    """Runs paged_decode_attention once for every (batch, slot-table width) on
    inputs that read one slot, so that Triton compiles now, at load, the
    variants those shapes select (one split or several, the combine kernel's
    BLOCK_S, integer arguments that equal 1 or divide by 16), and not inside a
    serving step: on a fresh H100 the first decode graph of a new width took
    0.3-1 s to capture, against 15-60 ms once compiled. A variant already
    compiled costs one launch."""
    buffer = torch.zeros((1, num_kv_heads, head_dim), dtype=dtype, device=device)
    for batch in batches:
        q = torch.zeros((batch, num_heads, head_dim), dtype=dtype, device=device)
        lengths = torch.ones(batch, dtype=torch.int32, device=device)
        for width in widths:
            table = torch.zeros((batch, width), dtype=torch.int32, device=device)
            paged_decode_attention(q, buffer, buffer, table, lengths, 1.0)


def _check_inputs(q, k_buffer, v_buffer, slot_table, seq_lens) -> None:
    """Shapes, dtypes and devices; nothing that needs the tensors' values (that
    would synchronize with the GPU)."""
    if q.dim() != 3 or k_buffer.dim() != 3 or v_buffer.shape != k_buffer.shape:
        raise ValueError(
            f"want q [B, H, D] and k/v buffers [S, KVH, D] of one shape; got "
            f"{tuple(q.shape)}, {tuple(k_buffer.shape)}, {tuple(v_buffer.shape)}"
        )
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    if k_buffer.shape[2] != head_dim or num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(
            f"q {tuple(q.shape)} does not fit kv buffers {tuple(k_buffer.shape)}: "
            "head_dim must match and the query heads must be a multiple of the kv heads"
        )
    if not 1 <= head_dim <= _MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} is not supported (at most {_MAX_HEAD_DIM})")
    if q.dtype not in _DTYPES or k_buffer.dtype != q.dtype or v_buffer.dtype != q.dtype:
        raise ValueError(
            f"q, k and v must share one of float16, bfloat16, float32; got "
            f"{q.dtype}, {k_buffer.dtype}, {v_buffer.dtype}"
        )
    if slot_table.dim() != 2 or slot_table.shape[0] != batch or slot_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"slot_table must be int32 [B={batch}, max_len]; got {slot_table.dtype} {tuple(slot_table.shape)}"
        )
    if seq_lens.shape != (batch,) or seq_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"seq_lens must be int32 [B={batch}]; got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    if batch and slot_table.shape[1] == 0:
        raise ValueError("slot_table has no columns, but every sequence has at least one token")
    devices = {t.device for t in (q, k_buffer, v_buffer, slot_table, seq_lens)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device; got {sorted(map(str, devices))}")


def _stage1_config(group_size: int, block_d: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """(query heads, tokens per loop iteration, warps) of a stage-1 program.
    Query heads: the whole GQA group where it fits, padded to 16 (tl.dot's
    minimum M; the padding rows cost tensor-core work, which decoding has to
    spare, not memory traffic), so each key/value row is loaded once per group.
    The sizes keep the accumulator and the double-buffered key/value blocks in
    registers and shared memory without spilling (checked with ptxas for sm_90:
    about 80-150 registers a thread for 16-bit types, so ~4 programs fit on an SM)."""
    max_heads = 16 if dtype == torch.float32 else 64  # float32 tiles are twice the size
    block_g = max(16, min(max_heads, _next_power_of_2(group_size)))
    block_n = 64 if block_d <= 128 else 32
    wide = block_g * block_d >= 64 * 128 or (dtype == torch.float32 and block_d > 128)
    return block_g, block_n, 8 if wide else 4


def _auto_num_splits(programs: int, max_len: int, device: torch.device) -> int:
    """Enough splits that stage 1 has about _PROGRAMS_PER_SM programs per SM, but
    none shorter than _MIN_TOKENS_PER_SPLIT tokens. A large batch needs no split
    (batch x kv heads already fills the GPU); one long sequence needs many."""
    if max_len <= _SINGLE_SPLIT_MAX_LEN:
        return 1
    wanted = _cdiv(_PROGRAMS_PER_SM * _sm_count(device), programs)
    return max(1, min(wanted, _cdiv(max_len, _MIN_TOKENS_PER_SPLIT), _MAX_SPLITS))


def _split_tokens(max_len: int, num_splits: int, block_n: int) -> tuple[int, int]:
    """(tokens per split, splits to launch). Every split but a sequence's last
    holds whole blocks of block_n tokens, so only the final block of a sequence is
    partly masked; rounding up can leave fewer splits than asked."""
    num_splits = max(1, min(num_splits, _MAX_SPLITS))
    tokens_per_split = _cdiv(_cdiv(max_len, num_splits), block_n) * block_n
    return tokens_per_split, _cdiv(max_len, tokens_per_split)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _CPU_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1
