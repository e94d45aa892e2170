"""The fused decoder kernels (services/gpu_agent/engine/fused_ops.py) against
the torch ops they replace (rotary.py, paged_attention.write_kv, F.rms_norm,
F.silu).

On CUDA the kernels run compiled; without CUDA under Triton's CPU interpreter
(TRITON_INTERPRET=1 while triton and the module are imported and while these
tests run, as in test_triton_decode.py), where bfloat16 cases skip. Skipped
where triton is not installed (CI: CPU torch only)."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from services.gpu_agent.engine.model_config import load_model_config
from services.gpu_agent.engine.paged_attention import StepAttention, write_kv
from services.gpu_agent.engine.rotary import RotaryEmbedding, apply_rotary
from tests.triton_interpreter import interpreter_env

ON_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
ROOT = Path(__file__).resolve().parent.parent


with interpreter_env():
    triton = pytest.importorskip("triton")
    fo = importlib.import_module("services.gpu_agent.engine.fused_ops")
    if not ON_CUDA and type(fo._silu_mul_kernel).__name__ != "InterpretedFunction":
        fo = importlib.reload(fo)  # imported earlier in this process, compiled for a GPU

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# The fused kernels round once where the torch ops round twice (x * cos, then the
# sum): up to an ulp or two of the 16-bit types apart.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(scope="module", autouse=True)
def _interpreter_runs():
    with interpreter_env():
        yield


def _skip_unsupported(dtype: torch.dtype) -> None:
    if dtype == torch.bfloat16 and not ON_CUDA:
        pytest.skip("Triton's CPU interpreter does not support bfloat16; runs on CUDA")


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.float().cpu(), expected.float().cpu(), atol=tol, rtol=tol)


def _cos_sin(tokens: int, head_dim: int, dtype: torch.dtype, gen: torch.Generator):
    config = load_model_config(ROOT / "bench" / "configs" / "llama-3.2-1b")
    config = dataclasses.replace(config, head_dim=head_dim)
    rotary = RotaryEmbedding(config).to(DEVICE)
    positions = torch.randint(0, 5000, (tokens,), generator=gen).to(DEVICE)
    return rotary.cos_sin(positions, dtype)


# (heads, kv heads, head_dim): Llama-3.2-1B, Llama-3.1-8B, no GQA, Qwen2-0.5B (14 heads), an odd head_dim.
GEOMETRIES = [(32, 8, 64), (32, 8, 128), (4, 4, 128), (14, 2, 64), (8, 2, 80)]


@pytest.mark.parametrize("joined", [True, False], ids=["joined", "separate"])
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("heads,kv_heads,head_dim", GEOMETRIES, ids=[f"{h}-{k}-{d}" for h, k, d in GEOMETRIES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rotary_write_kv_matches_the_torch_ops(dtype, heads, kv_heads, head_dim, tokens, joined):
    _skip_unsupported(dtype)
    gen = torch.Generator().manual_seed(heads * 1000 + tokens * 10 + head_dim)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    if joined:  # slices of one qkv output, as the joined projection gives them
        qkv = torch.randn(tokens, q_size + 2 * kv_size, generator=gen).to(dtype).to(DEVICE)
        q, k, v = qkv[:, :q_size], qkv[:, q_size : q_size + kv_size], qkv[:, q_size + kv_size :]
    else:
        q, k, v = (torch.randn(tokens, n, generator=gen).to(dtype).to(DEVICE) for n in (q_size, kv_size, kv_size))
    cos, sin = _cos_sin(tokens, head_dim, dtype, gen)
    slots = 3 * tokens + 7
    slot_mapping = torch.randperm(slots, generator=gen)[:tokens].to(DEVICE)
    # Every slot not written holds NaN: a write to the wrong slot shows.
    k_buffer = torch.full((slots, kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    v_buffer = torch.full_like(k_buffer, float("nan"))
    k_ref, v_ref = k_buffer.clone(), v_buffer.clone()

    q_out = fo.rotary_write_kv(q, k, v, cos, sin, k_buffer, v_buffer, slot_mapping)

    q_expected = apply_rotary(q.reshape(tokens, heads, head_dim), cos, sin)
    k_rotated = apply_rotary(k.reshape(tokens, kv_heads, head_dim), cos, sin)
    write_kv(k_ref, v_ref, StepAttention(slot_mapping, [], 0), k_rotated, v.reshape(tokens, kv_heads, head_dim))
    assert q_out.shape == (tokens, heads, head_dim) and q_out.dtype == dtype
    _close(q_out, q_expected, dtype)
    written = torch.zeros(slots, dtype=torch.bool)
    written[slot_mapping.cpu()] = True
    assert torch.isnan(k_buffer[~written.to(DEVICE)]).all() and torch.isnan(v_buffer[~written.to(DEVICE)]).all()
    _close(k_buffer[slot_mapping], k_ref[slot_mapping], dtype)
    torch.testing.assert_close(v_buffer[slot_mapping], v_ref[slot_mapping], atol=0, rtol=0)  # copied exactly


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "none"])
@pytest.mark.parametrize("tokens,hidden", [(1, 2048), (3, 896), (2, 4096)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_add_rms_norm_matches_add_then_rms_norm(dtype, tokens, hidden, residual):
    _skip_unsupported(dtype)
    gen = torch.Generator().manual_seed(tokens * hidden)
    x = (3 * torch.randn(tokens, hidden, generator=gen)).to(dtype).to(DEVICE)
    res = torch.randn(tokens, hidden, generator=gen).to(dtype).to(DEVICE) if residual else None
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(DEVICE)
    out, summed = fo.add_rms_norm(x, res, weight, 1e-5)
    expected_sum = x + res if residual else x
    torch.testing.assert_close(summed, expected_sum, atol=0, rtol=0)  # rounded like the torch add
    expected = F.rms_norm(expected_sum.float(), (hidden,), eps=1e-5) * weight.float()
    assert out.dtype == dtype and out.shape == x.shape
    _close(out, expected, dtype)


@pytest.mark.parametrize("tokens,inter", [(1, 8192), (4, 4864), (2, 100)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_mul_matches_silu_times_up(dtype, tokens, inter):
    _skip_unsupported(dtype)
    gen = torch.Generator().manual_seed(tokens + inter)
    gate_up = (4 * torch.randn(tokens, 2 * inter, generator=gen)).to(dtype).to(DEVICE)
    gate, up = gate_up.chunk(2, dim=-1)
    out = fo.silu_mul(gate_up)
    assert out.shape == (tokens, inter) and out.dtype == dtype
    _close(out, F.silu(gate) * up, dtype)


def test_disabled_by_the_environment(monkeypatch):
    monkeypatch.setenv("PRISM_FUSED_OPS", "0")
    assert not fo.fused_ops_enabled()
    monkeypatch.setenv("PRISM_FUSED_OPS", "1")
    assert fo.fused_ops_enabled()


@pytest.mark.parametrize("rows,n", [(1, 128256), (3, 151936), (5, 1000), (2, 4096)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_argmax_rows_matches_argmax(dtype, rows, n):
    _skip_unsupported(dtype)
    gen = torch.Generator().manual_seed(rows * n)
    x = torch.randn(rows, n, generator=gen).to(dtype).to(DEVICE)
    assert torch.equal(fo.argmax_rows(x).cpu(), x.argmax(dim=-1).cpu())


def test_argmax_rows_takes_the_first_of_equal_maxima():
    x = torch.zeros(4, 10000, device=DEVICE)
    x[0, [7, 9000]] = 5.0  # in two chunks
    x[1, [4097, 4098]] = 5.0  # in one chunk, not the first
    x[2] = 1.0  # all equal
    x[3, [9999, 5000]] = 2.0
    assert fo.argmax_rows(x).tolist() == [7, 4097, 0, 5000]
