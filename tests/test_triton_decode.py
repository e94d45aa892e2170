"""The Triton decode-attention kernel (services/gpu_agent/engine/triton_decode.py)
against a plain torch reference.

On CUDA the kernels run compiled; without CUDA they run under Triton's CPU
interpreter on CPU tensors (TRITON_INTERPRET=1, set while triton and the kernel
module are imported and while this module's tests run, and restored otherwise).
bfloat16 cases need CUDA. Skipped where triton is not installed (CI: CPU torch
only)."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch

from tests.triton_interpreter import interpreter_env

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")


with interpreter_env():
    triton = pytest.importorskip("triton")
    td = importlib.import_module("services.gpu_agent.engine.triton_decode")
    if not ON_CUDA and type(td._attend_split_kernel).__name__ != "InterpretedFunction":
        td = importlib.reload(td)  # imported earlier in this process, compiled for a GPU
paged_decode_attention = td.paged_decode_attention

# The interpreter's scalars are 1-element arrays, which newer numpy warns about converting to int.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
ROOT = Path(__file__).resolve().parent.parent
# Triton's interpreter does not support bfloat16 (a documented limitation: its tl.dot
# multiplies the raw bits), so without CUDA the bfloat16 cases skip and the tests that
# only need some 16-bit type use float16.
HALF = torch.bfloat16 if ON_CUDA else torch.float16
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}  # atol = rtol
# Ragged lengths: single tokens, block edges (the kernel reads 64 or 32 tokens a step), 1000+.
LENS = {
    1: [1037],
    3: [1, 100, 1029],
    17: [1, 2, 100, 1000, 1100, 3, 64, 65, 128, 129, 5, 700, 17, 255, 256, 257, 1],
}


@pytest.fixture(scope="module", autouse=True)
def _interpreter_runs():
    """Runs this module's tests with TRITON_INTERPRET set (without CUDA).
    Where the interpreter itself cannot run the kernels, say so as a skip rather
    than as failures of the kernel: some triton releases' interpreter breaks under
    newer numpy (a loop bounded by a loaded value raises 'only 0-dimensional arrays
    can be converted'), and triton imported before the variable was set compiles
    its library functions for a GPU."""
    with interpreter_env():
        if not ON_CUDA:
            case = make_case([3], heads=2, kv_heads=1, head_dim=16, dtype=torch.float32)
            try:
                paged_decode_attention(*case, 0.25)
            except Exception as exc:  # InterpreterError wraps the numpy error
                if "0-dimensional" in repr(exc):
                    pytest.skip(f"triton {triton.__version__}'s interpreter does not run under this numpy: {exc!r}")
                if "outside of the scope of a kernel" in repr(exc):
                    pytest.skip("triton was imported in this process before TRITON_INTERPRET was set")
                raise
        yield


# ---- the reference and the inputs -------------------------------------------------------


def reference(q, k_buffer, v_buffer, slot_table, seq_lens, scale) -> torch.Tensor:
    """softmax(q . K^T * scale) . V per sequence and head in float32, with the rows
    gathered by slot and the kv heads repeated for their query heads."""
    group = q.shape[1] // k_buffer.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32)
    for b, n in enumerate(seq_lens.tolist()):
        slots = slot_table[b, :n].long().cpu()
        keys = k_buffer.cpu()[slots].float().repeat_interleave(group, dim=1)  # [n, H, D]
        values = v_buffer.cpu()[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].cpu().float(), keys) * scale
        out[b] = torch.einsum("hn,nhd->hd", scores.softmax(dim=-1), values)
    return out


def make_case(
    lens: list[int],
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    *,
    seed: int = 0,
    pad_slot: int | None = None,
    spare_rows: int = 64,
):
    """(q, k_buffer, v_buffer, slot_table, seq_lens) with each sequence's tokens
    at random slots scattered over a buffer larger than needed. Rows that no
    sequence uses hold NaN, so reading any of them poisons the output. Padding
    entries of the slot table name such a row, or `pad_slot` when given."""
    if dtype == torch.bfloat16 and not ON_CUDA:
        pytest.skip("Triton's CPU interpreter does not support bfloat16; runs on CUDA")
    gen = torch.Generator().manual_seed(seed)
    total = sum(lens)
    rows = total + spare_rows
    k_buffer = torch.full((rows, kv_heads, head_dim), float("nan"), dtype=dtype)
    v_buffer = torch.full((rows, kv_heads, head_dim), float("nan"), dtype=dtype)
    order = torch.randperm(rows, generator=gen)
    used, unused = order[:total], order[total:]
    k_buffer[used] = torch.randn(total, kv_heads, head_dim, generator=gen).to(dtype)
    v_buffer[used] = torch.randn(total, kv_heads, head_dim, generator=gen).to(dtype)
    pad = int(unused[0]) if pad_slot is None else pad_slot
    slot_table = torch.full((len(lens), max(lens)), pad, dtype=torch.int32)
    offset = 0
    for b, n in enumerate(lens):
        slot_table[b, :n] = used[offset : offset + n].int()
        offset += n
    q = torch.randn(len(lens), heads, head_dim, generator=gen).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    return tuple(t.to(DEVICE) for t in (q, k_buffer, v_buffer, slot_table, seq_lens))


def check(case, scale: float | None = None, num_splits: int | None = None) -> torch.Tensor:
    q = case[0]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = paged_decode_attention(*case, scale, num_splits=num_splits)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    expected = reference(*case, scale)
    tol = TOLERANCE[q.dtype]
    torch.testing.assert_close(out.float().cpu(), expected, atol=tol, rtol=tol)
    return out


# ---- agreement with the reference --------------------------------------------------------

# (query heads, kv heads): GQA ratios 1, 4 and 8.
GQA = [(4, 4), (8, 2), (16, 2)]


@pytest.mark.parametrize("head_dim", [64, 128, 80])
@pytest.mark.parametrize("heads,kv_heads", GQA, ids=[f"gqa{h // kv}" for h, kv in GQA])
@pytest.mark.parametrize("batch", sorted(LENS))
def test_shapes_match_reference(batch, heads, kv_heads, head_dim):
    check(make_case(LENS[batch], heads, kv_heads, head_dim, torch.float16, seed=batch))


@pytest.mark.parametrize("num_splits", [None, 1, 3, 64], ids=["auto", "1", "3", "64"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_dtypes_and_splits_match_reference(dtype, num_splits):
    check(make_case(LENS[17], 8, 2, 128, dtype, seed=7), num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [1, 2, 5, 17, 64])
def test_every_split_count_gives_the_same_answer(num_splits):
    """One long sequence beside short ones: the short ones' later splits are
    empty, and the combine stage must leave them out."""
    case = make_case([1, 1500, 2, 65], 8, 2, 64, torch.float32, seed=3)
    check(case, num_splits=num_splits)


@pytest.mark.parametrize("head_dim", [16, 32, 96, 256, 8])
@pytest.mark.parametrize("dtype", [HALF, torch.float32], ids=str)
def test_other_head_dims(head_dim, dtype):
    check(make_case([1, 70, 300], 4, 2, head_dim, dtype, seed=head_dim))


@pytest.mark.parametrize("dtype", [HALF, torch.float32], ids=str)
@pytest.mark.parametrize("heads,kv_heads", [(64, 1), (128, 2), (24, 8), (40, 8)])
def test_wide_and_odd_groups(heads, kv_heads, dtype):
    """Groups wider than one program's block of query heads (several programs
    per kv head), and group sizes that are not powers of two."""
    check(make_case([5, 200], heads, kv_heads, 32, dtype, seed=heads), num_splits=2)


def test_peaked_scores_rescale_across_blocks_and_splits():
    """Large scores (exp would overflow float32 without subtracting the max),
    with the maximum in different blocks and splits for different heads."""
    case = make_case([900, 37], 8, 2, 64, torch.float32, seed=11)
    for num_splits in (1, 4):
        out = check(case, scale=4.0, num_splits=num_splits)
        assert torch.isfinite(out).all()


def test_padding_slots_are_never_dereferenced():
    """Padding entries far outside the buffer: a load through them would fault
    (GPU) or crash (interpreter) instead of being masked out."""
    for pad_slot in (2**31 - 1, -(2**31)):
        check(make_case([1, 130, 7], 8, 2, 64, torch.float16, pad_slot=pad_slot), num_splits=3)


def test_llama_geometry_long_context():
    """Llama-3.1-8B's attention (32 heads, 8 kv heads, head_dim 128, bf16 on CUDA)."""
    lens = [4100, 1, 777, 2048] if ON_CUDA else [300, 1, 77]
    case = make_case(lens, 32, 8, 128, HALF, seed=5)
    for num_splits in (None, 1, 8):
        check(case, num_splits=num_splits)


# ---- layouts -----------------------------------------------------------------------------


def test_strided_buffers_and_query():
    """K and V as interleaved views of one [slots, 2, kv_heads, head_dim] buffer
    (a first-dim stride twice their row size), and q a slice of a fused
    projection's output: the kernel must follow the strides."""
    q, k_buffer, v_buffer, slot_table, seq_lens = make_case([3, 90, 200], 8, 2, 64, HALF, seed=2)
    kv = torch.stack([k_buffer, v_buffer], dim=1)  # [S, 2, KVH, D]
    k_view, v_view = kv[:, 0], kv[:, 1]
    assert not k_view.is_contiguous() and k_view.stride(0) == 2 * k_buffer.stride(0)
    fused = torch.cat([q, torch.zeros_like(q[:, :4])], dim=1)  # [B, H + 4, D]
    q_view = fused[:, :8]
    assert not q_view.is_contiguous()
    case = (q_view, k_view, v_view, slot_table, seq_lens)
    check(case, num_splits=1)
    check(case, num_splits=4)


def test_slot_table_wider_than_the_longest_sequence_and_int64():
    q, k_buffer, v_buffer, slot_table, seq_lens = make_case([3, 40], 4, 4, 32, torch.float32, seed=4)
    wide = torch.cat([slot_table, torch.full_like(slot_table, -1)], dim=1)
    check((q, k_buffer, v_buffer, wide, seq_lens), num_splits=2)
    check((q, k_buffer, v_buffer, slot_table.long(), seq_lens.long()))


# ---- host side ---------------------------------------------------------------------------


def test_empty_batch():
    q, k_buffer, v_buffer, _, _ = make_case([4], 4, 2, 32, torch.float16)
    out = paged_decode_attention(
        q[:0],
        k_buffer,
        v_buffer,
        torch.zeros((0, 1), dtype=torch.int32, device=DEVICE),
        torch.zeros(0, dtype=torch.int32, device=DEVICE),
        0.1,
    )
    assert out.shape == (0, 4, 32)


def test_rejects_bad_inputs():
    q, k_buffer, v_buffer, slot_table, seq_lens = make_case([4, 9], 4, 2, 32, torch.float16)
    bad = {
        "dtype": (q.float(), k_buffer, v_buffer, slot_table, seq_lens),
        "heads": (q[:, :3], k_buffer, v_buffer, slot_table, seq_lens),
        "head_dim": (q[..., :16], k_buffer, v_buffer, slot_table, seq_lens),
        "table rows": (q, k_buffer, v_buffer, slot_table[:1], seq_lens),
        "table dtype": (q, k_buffer, v_buffer, slot_table.float(), seq_lens),
        "lens shape": (q, k_buffer, v_buffer, slot_table, seq_lens[:1]),
    }
    for name, args in bad.items():
        try:
            paged_decode_attention(*args, 0.1)
        except ValueError:
            continue
        pytest.fail(f"a bad {name} was not rejected")
    big = torch.zeros(1, 1, 512, dtype=torch.float16, device=DEVICE)
    with pytest.raises(ValueError, match="head_dim"):
        paged_decode_attention(big, big, big, slot_table[:1], seq_lens[:1], 0.1)


def test_split_choice(monkeypatch):
    """Few sequences with long contexts get enough splits to fill an H100's 132
    SMs; many sequences or short contexts get few; an override is honoured up
    to whole token blocks."""
    monkeypatch.setattr(td, "_sm_count", lambda device: 132)
    # One 16K-token sequence, 8 kv heads: 8 programs alone would leave 124 SMs idle.
    tokens, launched = td._split_tokens(16384, td._auto_num_splits(8, 16384, DEVICE), 64)
    assert launched * 8 >= 2 * 132 and tokens % 64 == 0 and tokens * launched >= 16384
    assert td._auto_num_splits(64 * 8, 4096, DEVICE) <= 2  # the batch fills the GPU already
    assert td._auto_num_splits(8, 100, DEVICE) == 1  # too short to be worth splitting
    assert td._split_tokens(16384, 1, 64) == (16384, 1)
    assert td._split_tokens(1000, 3, 64) == (384, 3)
    assert td._split_tokens(100, 64, 64) == (64, 2)  # no split shorter than one block
    assert td._split_tokens(1, 8, 64) == (64, 1)
