"""Fused elementwise steps of the decoder, as Triton kernels, for CUDA.

At batch 1 a small model's decode step is mostly its number of kernels, not
their bytes (Llama-3.2-1B on an H200: about 300 kernels a step, 1.4 ms against
a 0.6 ms memory floor). Three fusions take roughly 100 of them away:
  rotary_write_kv: the rotary embedding of q and k (three kernels) and the
    writes of k and v into their pool slots (two index_put kernels) in one
    kernel, reading the joined qkv projection once;
  add_rms_norm: a residual add and the RMSNorm that follows it in one;
  silu_mul: SiLU(gate) * up over the joined gate/up projection in one.
Each rounds where the unfused torch ops round (the residual sum and SiLU to
the model dtype before their next use), so the fused model computes what the
unfused one does up to float32 accumulation order.

The model (model.py) uses them on CUDA where triton imports, unless
PRISM_FUSED_OPS=0 or CausalLM.use_fused_ops is False; the torch ops stay as
the fallback and the CPU path. triton is imported guarded, as in
triton_decode.py, so this module imports anywhere."""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    _TRITON_IMPORTED = True
except Exception:  # noqa: BLE001  ImportError, or a broken install: the model keeps the torch ops
    _TRITON_IMPORTED = False

    class _NoTriton:
        constexpr = object

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _NoTriton()

_MAX_ROW = 65536  # add_rms_norm holds a whole row in one program


def fused_ops_enabled() -> bool:
    """Whether the model should use these kernels on CUDA tensors (triton imports,
    and PRISM_FUSED_OPS is not 0). Never raises."""
    return _TRITON_IMPORTED and os.environ.get("PRISM_FUSED_OPS", "1") != "0"


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


# ---- rotary embedding + KV slot writes -------------------------------------------------


@triton.jit
def _rotate_heads(
    src_ptr,
    src_stride_t,
    dst_ptr,
    dst_stride_h,
    dst_stride_d,
    cos_ptr,
    sin_ptr,
    token,
    num_heads,
    head_dim,
    half,
    ROTATE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One token's heads [num_heads, head_dim] from src (row `token`, heads back to
    back) to dst (already offset to the token's row or slot), rotated or copied."""
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads < num_heads)[:, None] & (dims < head_dim)[None, :]
    row = src_ptr + token * src_stride_t + heads[:, None] * head_dim
    x = tl.load(row + dims[None, :], mask=mask, other=0.0)
    if ROTATE:
        # x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x2, x1): the
        # partner of dim d is d + half (first half) or d - half (second half), and
        # the minus sign is already in the first half of the signed sin.
        partner = tl.where(dims < half, dims + half, dims - half)
        xp = tl.load(row + partner[None, :], mask=mask, other=0.0)
        cos = tl.load(cos_ptr + dims, mask=dims < head_dim, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + dims, mask=dims < head_dim, other=0.0).to(tl.float32)
        x = x.to(tl.float32) * cos[None, :] + xp.to(tl.float32) * sin[None, :]
    tl.store(
        dst_ptr + heads[:, None] * dst_stride_h + dims[None, :] * dst_stride_d,
        x.to(dst_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _rotary_kv_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    q_stride_t,
    k_stride_t,
    v_stride_t,
    cos_ptr,
    sin_ptr,
    cos_stride_t,
    sin_stride_t,
    slots_ptr,
    q_out_ptr,
    k_buf_ptr,
    v_buf_ptr,
    q_out_stride_t,
    q_out_stride_h,
    q_out_stride_d,
    k_stride_s,
    k_stride_h,
    k_stride_d,
    v_stride_s,
    v_stride_h,
    v_stride_d,
    num_heads,
    num_kv_heads,
    head_dim,
    half,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    part = tl.program_id(1)  # 0: q, 1: k, 2: v
    cos_row = cos_ptr + token * cos_stride_t
    sin_row = sin_ptr + token * sin_stride_t
    if part == 0:
        _rotate_heads(
            q_ptr,
            q_stride_t,
            q_out_ptr + token * q_out_stride_t,
            q_out_stride_h,
            q_out_stride_d,
            cos_row,
            sin_row,
            token,
            num_heads,
            head_dim,
            half,
            ROTATE=True,
            BLOCK_H=BLOCK_HQ,
            BLOCK_D=BLOCK_D,
        )
    else:
        # int64: slot * stride can pass 2**31 elements in a large virtual reservation.
        slot = tl.load(slots_ptr + token).to(tl.int64)
        if part == 1:
            _rotate_heads(
                k_ptr,
                k_stride_t,
                k_buf_ptr + slot * k_stride_s,
                k_stride_h,
                k_stride_d,
                cos_row,
                sin_row,
                token,
                num_kv_heads,
                head_dim,
                half,
                ROTATE=True,
                BLOCK_H=BLOCK_HKV,
                BLOCK_D=BLOCK_D,
            )
        else:
            _rotate_heads(
                v_ptr,
                v_stride_t,
                v_buf_ptr + slot * v_stride_s,
                v_stride_h,
                v_stride_d,
                cos_row,
                sin_row,
                token,
                num_kv_heads,
                head_dim,
                half,
                ROTATE=False,
                BLOCK_H=BLOCK_HKV,
                BLOCK_D=BLOCK_D,
            )


def rotary_write_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    signed_sin: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """q: [tokens, heads * head_dim], k and v: [tokens, kv_heads * head_dim], each
    with unit-stride rows (slices of the joined qkv output will do); cos/signed_sin: [tokens, head_dim] (rotary.py).
    Writes rotated k and plain v into k_buffer/v_buffer ([slots, kv_heads,
    head_dim]) at slot_mapping [tokens]; returns rotated q [tokens, heads, head_dim]."""
    tokens = q.shape[0]
    num_kv_heads, head_dim = k_buffer.shape[1], k_buffer.shape[2]
    num_heads = q.shape[1] // head_dim
    if (
        head_dim % 2
        or q.stride(1) != 1
        or k.stride(1) != 1
        or v.stride(1) != 1
        or cos.stride(1) != 1
        or signed_sin.stride(1) != 1
    ):
        raise ValueError("rotary_write_kv wants unit-stride rows and an even head_dim")
    q_out = torch.empty((tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if tokens == 0:
        return q_out
    block_d = _next_power_of_2(head_dim)
    block_hq, block_hkv = _next_power_of_2(num_heads), _next_power_of_2(num_kv_heads)
    _rotary_kv_kernel[(tokens, 3)](
        q,
        k,
        v,
        q.stride(0),
        k.stride(0),
        v.stride(0),
        cos,
        signed_sin,
        cos.stride(0),
        signed_sin.stride(0),
        slot_mapping,
        q_out,
        k_buffer,
        v_buffer,
        *q_out.stride(),
        *k_buffer.stride(),
        *v_buffer.stride(),
        num_heads,
        num_kv_heads,
        head_dim,
        head_dim // 2,
        BLOCK_HQ=block_hq,
        BLOCK_HKV=block_hkv,
        BLOCK_D=block_d,
        num_warps=4 if block_hq * block_d <= 4096 else 8,
    )
    return q_out


# ---- residual add + RMSNorm -------------------------------------------------------------


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,
    res_ptr,
    weight_ptr,
    out_ptr,
    res_out_ptr,
    x_stride,
    res_stride,
    out_stride,
    res_out_stride,
    n,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
        # Rounded to the model dtype, as the unfused `x + residual` is, before the norm reads it.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * res_out_stride + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (xf * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual: [tokens, hidden]. Returns (rms_norm(s) * weight, s) with
    s = x + residual (in x's dtype), or s = x where residual is None."""
    tokens, n = x.shape
    if n > _MAX_ROW or x.stride(1) != 1 or (residual is not None and residual.stride(1) != 1):
        raise ValueError("add_rms_norm wants unit-stride rows of at most 65536 elements")
    out = torch.empty_like(x)
    summed = torch.empty_like(x) if residual is not None else x
    if tokens == 0:
        return out, summed
    block = _next_power_of_2(n)
    res = residual if residual is not None else x
    _add_rms_norm_kernel[(tokens,)](
        x,
        res,
        weight,
        out,
        summed,
        x.stride(0),
        res.stride(0),
        out.stride(0),
        summed.stride(0),
        n,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=max(1, min(16, block // 512)),
    )
    return out, summed


# ---- SiLU(gate) * up --------------------------------------------------------------------


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, in_stride, out_stride, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    gate = tl.load(gate_up_ptr + row * in_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * in_stride + n + cols, mask=mask, other=0.0)
    # SiLU rounded to the model dtype before the product, as F.silu(gate) * up rounds.
    silu = (gate / (1.0 + tl.exp(-gate))).to(up.dtype)
    tl.store(out_ptr + row * out_stride + cols, (silu.to(tl.float32) * up.to(tl.float32)).to(up.dtype), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [tokens, 2 * inter] (gate, then up). Returns SiLU(gate) * up, [tokens, inter]."""
    tokens, double = gate_up.shape
    if double % 2 or gate_up.stride(1) != 1:
        raise ValueError("silu_mul wants unit-stride rows of even length")
    n = double // 2
    out = torch.empty((tokens, n), dtype=gate_up.dtype, device=gate_up.device)
    if tokens == 0:
        return out
    block = min(1024, _next_power_of_2(n))
    _silu_mul_kernel[(tokens, triton.cdiv(n, block))](
        gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=block, num_warps=4
    )
    return out


# ---- greedy tokens: argmax of each row ----------------------------------------------------

_ARGMAX_BLOCK = 4096


@triton.jit
def _argmax_chunks_kernel(x_ptr, part_max_ptr, part_idx_ptr, x_stride, n, num_chunks, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    cols = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * x_stride + cols, mask=cols < n, other=float("-inf")).to(tl.float32)
    best = tl.max(x, 0)
    # The first column that holds the maximum (argmax's choice among equals).
    first = tl.min(tl.where(x == best, cols, n), 0)
    tl.store(part_max_ptr + row * num_chunks + chunk, best)
    tl.store(part_idx_ptr + row * num_chunks + chunk, first)


@triton.jit
def _argmax_combine_kernel(part_max_ptr, part_idx_ptr, out_ptr, num_chunks, BLOCK_C: tl.constexpr):
    row = tl.program_id(0)
    chunks = tl.arange(0, BLOCK_C)
    mask = chunks < num_chunks
    maxes = tl.load(part_max_ptr + row * num_chunks + chunks, mask=mask, other=float("-inf"))
    idx = tl.load(part_idx_ptr + row * num_chunks + chunks, mask=mask, other=0)
    best = tl.max(maxes, 0)
    # Chunks are in column order, so the smallest index among the best chunks is the first.
    big = tl.full([BLOCK_C], 2147483647, dtype=tl.int32)
    tl.store(out_ptr + row, tl.min(tl.where(mask & (maxes == best), idx, big), 0).to(tl.int64))


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """x: [rows, n] float. The index of each row's maximum (the first, among equal
    ones), int64 [rows]: torch.argmax(x, -1) for rows without NaN, in two small
    kernels where torch's one reduction for a 128k vocabulary row takes ~25 us."""
    rows, n = x.shape
    if x.stride(1) != 1 or n == 0 or n >= 2**31:
        return x.argmax(dim=-1)
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows == 0:
        return out
    chunks = triton.cdiv(n, _ARGMAX_BLOCK)
    part_max = torch.empty((rows, chunks), dtype=torch.float32, device=x.device)
    part_idx = torch.empty((rows, chunks), dtype=torch.int32, device=x.device)
    _argmax_chunks_kernel[(rows, chunks)](
        x, part_max, part_idx, x.stride(0), n, chunks, BLOCK=_ARGMAX_BLOCK, num_warps=8
    )
    _argmax_combine_kernel[(rows,)](part_max, part_idx, out, chunks, BLOCK_C=_next_power_of_2(chunks), num_warps=1)
    return out
