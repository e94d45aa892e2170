"""Tensor parallelism on two GPUs: NCCL all-reduces inside the forward (the
fused kernels' path on rank 0 and its follower), the step channel on a gloo
group beside it, and both ranks' weights switched off and on. Skipped without
two CUDA devices (CI); run on the GPU host with
`source .device/setup-kvcached.sh .device`. The ranks' code is the CPU test's
(tests/test_tensor_parallel.py::serve_split)."""

from __future__ import annotations

import pytest
import torch

from prism.tiny_models import write_tiny_model
from tests.test_tensor_parallel import one_rank_tokens, run_ranks, serve_split

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices"
)


def test_a_two_gpu_engine_generates_what_a_one_gpu_engine_does_and_again_after_switching(tmp_path):
    model_dir = write_tiny_model(tmp_path / "llama")
    got = run_ranks(serve_split, model_dir, "cuda", timeout_s=300)
    assert isinstance(got[0], list), f"rank 0 failed:\n{got[0]}"
    assert isinstance(got[1], int), f"rank 1 failed:\n{got[1]}"
    expected = one_rank_tokens(model_dir, device="cuda:0", kv_pool="pages", step_tokens=8)
    assert got[0][:2] == [expected, expected]  # before switching off, and after switching on again
    assert got[0][2] > 0
    assert got[1] > 10
