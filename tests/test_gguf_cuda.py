"""GGUF models on CUDA with the production path (issue 24, What 3): kvcached's pool, the Triton
decode kernel and CUDA graphs, switched off and on from host memory. Tiny GGUF files the test
writes (tests/gguf_models.py) serve exactly what their safetensors twins serve. Skipped where
there is no GPU, kvcached or triton (CI); run on the GPU host with
`source .device/setup-kvcached.sh .device`."""

from __future__ import annotations

import asyncio

import pytest
import torch
from gguf_models import write_gguf

from prism.tiny_models import write_tiny_model
from services.gpu_agent.engine import Engine
from tests.cuda_engine import PROMPTS, greedy, needs_cuda_kvcached_triton

pytestmark = needs_cuda_kvcached_triton


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """arch -> (safetensors folder, the same model as an F32 GGUF file)."""
    root = tmp_path_factory.mktemp("gguf-cuda")
    out = {}
    for arch in ("llama", "qwen2"):
        folder = write_tiny_model(root / arch, arch=arch)
        out[arch] = (folder, write_gguf(folder, root / f"{arch}.gguf"))
    return out


async def all_tokens(engine: Engine, prompts: list[str], max_tokens: int = 32) -> list[list[int]]:
    async def one(i: int, prompt: str) -> list[int]:
        return [t async for out in engine.generate(greedy(prompt, max_tokens, f"r{i}")) for t in out.token_ids]

    return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))  # batched decode


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
async def test_a_gguf_on_the_kvcached_graph_path_serves_what_its_twin_serves(twins, arch):
    folder, gguf_file = twins[arch]
    twin = Engine(folder, device="cuda", dtype="float32", kv_pool="kvcached", attention="triton")
    engine = Engine(gguf_file, device="cuda", dtype="float32", kv_pool="kvcached", attention="triton")
    try:
        twin.start()
        engine.start()
        assert (engine.serving_path.kv_pool, engine.serving_path.attention, engine.serving_path.cuda_graphs) == (
            "kvcached",
            "triton",
            True,
        )
        expected = await all_tokens(twin, PROMPTS)
        assert await all_tokens(engine, PROMPTS) == expected
        assert engine._runner.graph_runner is not None  # the batch decoded from a captured graph
        engine.deactivate()  # weights to host memory, KV and graphs released
        assert not engine.active and engine._runner.graph_runner is None
        engine.activate()
        assert await all_tokens(engine, PROMPTS) == expected
    finally:
        twin.stop()
        engine.stop()


async def test_a_quantized_gguf_runs_in_the_checkpoints_dtype_on_cuda(twins, tmp_path):
    folder, _ = twins["llama"]
    engine = Engine(write_gguf(folder, tmp_path / "q4_1.gguf", qtype="Q4_1"), device="cuda", kv_pool="kvcached")
    try:
        engine.start()
        assert engine.dtype == torch.bfloat16  # a GGUF names no dtype: auto takes bfloat16 on CUDA
        outs = await all_tokens(engine, PROMPTS, max_tokens=16)
        assert [len(o) for o in outs] == [16] * len(PROMPTS)
    finally:
        engine.stop()
