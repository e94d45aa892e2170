"""The engine on CUDA with its production KV path: kvcached's elastic pool and
the Triton decode kernel. Skipped where there is no GPU, kvcached or triton
(CI); run on the GPU host with `source .device/setup-kvcached.sh .device`."""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from pathlib import Path

import pytest

from prism.tiny_models import write_tiny_model
from services.gpu_agent.engine import Engine, GenerationRequest
from services.gpu_agent.engine.kvcached_pool import KvcachedPool
from services.gpu_agent.engine.request import ServingPath
from services.gpu_agent.engine.shared_weights import default_shared_dir
from services.gpu_agent.engine.tokenizer import Tokenizer
from services.gpu_agent.workers.remote_engine import RemoteEngine
from services.gpu_agent.workers.worker_pool import WorkerPool
from tests.cuda_engine import PROMPTS, greedy, needs_cuda_kvcached_triton
from tests.reference_llama import ReferenceLlama

pytestmark = needs_cuda_kvcached_triton


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuda-models")
    return {arch: write_tiny_model(root / arch, arch=arch) for arch in ("llama", "qwen2")}


async def tokens_of(engine: Engine, req: GenerationRequest) -> list[int]:
    return [t async for out in engine.generate(req) for t in out.token_ids]


async def test_two_kvcached_engines_in_one_process_match_the_reference(model_dirs):
    engines = {
        arch: Engine(path, device="cuda", dtype="float32", kv_pool="kvcached", attention="triton", step_tokens=16)
        for arch, path in model_dirs.items()
    }
    try:
        for engine in engines.values():
            engine.start()
            assert isinstance(engine._batcher.pool, KvcachedPool) and engine._runner.use_triton
        for arch, engine in engines.items():
            ref = ReferenceLlama(model_dirs[arch])
            reqs = [greedy(p, 24, f"{arch}{i}") for i, p in enumerate(PROMPTS)]
            outs = await asyncio.gather(*(tokens_of(engine, r) for r in reqs))  # batched decode through triton
            for req, out in zip(reqs, outs):
                assert out == ref.greedy(engine.tokenize_prompt(req), 24), req.request_id
            # Five sequences decode from the graph of batch 8 (three padding rows), and
            # fewer as the short ones end.
            assert engine._runner.graph_runner is not None and (8, 512) in engine._runner.graph_runner._graphs
    finally:
        for engine in engines.values():
            engine.stop()


async def test_kvcached_limit_squeeze_preempts_and_completes(model_dirs):
    engine = Engine(model_dirs["llama"], device="cuda", dtype="float32", kv_pool="kvcached")
    engine.start()
    try:
        ref = ReferenceLlama(model_dirs["llama"])
        reqs = [greedy(p, 60, f"s{i}") for i, p in enumerate(PROMPTS * 2)]
        tasks = [asyncio.create_task(tokens_of(engine, r)) for r in reqs]
        while engine.stats().running_requests < 4:
            await asyncio.sleep(0.001)
        state = engine.set_memory_limit(0)  # nothing fits: every running request is preempted, none fails
        assert state.status in ("deferred", "applied")
        # The squeeze takes effect at the engine's next step: wait for it (not a fixed sleep).
        deadline = asyncio.get_running_loop().time() + 10.0
        while not (engine.stats().running_requests == 0 and engine.stats().kv_used_bytes == 0):
            assert asyncio.get_running_loop().time() < deadline, f"the squeeze did not empty the pool: {engine.stats()}"
            await asyncio.sleep(0.001)
        engine.set_memory_limit(1 << 30)
        outs = await asyncio.gather(*tasks)
        for req, out in zip(reqs, outs):
            assert out == ref.greedy(engine.tokenize_prompt(req), 60), req.request_id
        assert engine.stats().kv_used_bytes == 0
    finally:
        engine.stop()


async def test_the_page_pool_replays_decode_graphs_too(model_dirs):
    """Without kvcached the engine keeps its CUDA graphs (issue 22): the page pool's extra padding row
    takes the padded rows' writes, and a batch of 15 (padded to 16) decodes as the reference does,
    across a switch off and on."""
    ref = ReferenceLlama(model_dirs["llama"])
    engine = Engine(model_dirs["llama"], device="cuda", dtype="float32", kv_pool="pages", attention="triton")
    engine.start()
    try:
        assert engine.serving_path == ServingPath("pages", "triton", True)
        assert not engine.serving_path.slow_on(engine.device)
        reqs = [greedy(p, 40, f"p{i}") for i, p in enumerate(PROMPTS * 3)]
        expected = [ref.greedy(engine.tokenize_prompt(r), 40) for r in reqs]
        assert await asyncio.gather(*(tokens_of(engine, r) for r in reqs)) == expected
        assert engine._runner.graph_runner is not None and (16, 512) in engine._runner.graph_runner._graphs
        engine.deactivate()
        engine.activate()
        assert await asyncio.gather(*(tokens_of(engine, r) for r in reqs)) == expected
    finally:
        engine.stop()


async def test_graph_and_eager_decode_match_the_reference_across_reactivation(model_dirs):
    ref = ReferenceLlama(model_dirs["llama"])
    for graphs in (True, False):
        engine = Engine(
            model_dirs["llama"],
            device="cuda",
            dtype="float32",
            kv_pool="kvcached",
            attention="triton",
            cuda_graphs=graphs,
        )
        engine.start()
        try:
            reqs = [greedy(p, 40, f"g{i}") for i, p in enumerate(PROMPTS * 3)]
            expected = [ref.greedy(engine.tokenize_prompt(r), 40) for r in reqs]
            assert await asyncio.gather(*(tokens_of(engine, r) for r in reqs)) == expected
            assert (engine._runner.graph_runner is not None) == graphs
            engine.deactivate()  # graphs go with the weights; decoding after activation captures anew
            assert engine._runner.graph_runner is None
            engine.activate()
            assert await asyncio.gather(*(tokens_of(engine, r) for r in reqs)) == expected
            assert engine.stats().kv_used_bytes == 0
        finally:
            engine.stop()


async def test_the_warm_up_captures_decode_graphs_and_leaves_none_behind(model_dirs, caplog):
    # Its graphs compile the graph path's Triton kernels for batches of 16, 8, 4, 2 and 1, on the
    # warm-up's own pool: none of them may survive it (they write that pool's slots).
    ref = ReferenceLlama(model_dirs["llama"])
    with caplog.at_level(logging.INFO, logger="services.gpu_agent.engine"):
        engine = Engine(
            model_dirs["llama"],
            device="cuda",
            dtype="float32",
            kv_pool="kvcached",
            attention="triton",
            cuda_graphs=True,
        )
    try:
        for batch in (16, 8, 4, 2, 1):
            assert f"captured the decode graph for batch {batch}," in caplog.text
        assert "warm-up incomplete" not in caplog.text and "warm-up failed" not in caplog.text
        assert engine._runner.graph_runner is None and engine._runner.use_graphs
        assert engine.stats().kv_used_bytes == 0
        engine.start()
        reqs = [greedy(p, 20, f"w{i}") for i, p in enumerate(PROMPTS)]
        expected = [ref.greedy(engine.tokenize_prompt(r), 20) for r in reqs]
        assert await asyncio.gather(*(tokens_of(engine, r) for r in reqs)) == expected
        assert engine._runner.graph_runner is not None
    finally:
        engine.stop()


@pytest.mark.parametrize("fused", [True, False], ids=["fused-kernels", "torch-ops"])
async def test_fused_kernels_and_torch_ops_both_match_the_reference(model_dirs, fused):
    """The decoder's fused Triton kernels (fused_ops.py: rotary + KV writes,
    add + RMSNorm, SiLU * up, argmax) and the torch ops they replace, through
    prefill, eager steps and CUDA graph steps, Llama and Qwen2 (q/k/v biases)."""
    for arch in ("llama", "qwen2"):
        engine = Engine(
            model_dirs[arch], device="cuda", dtype="float32", kv_pool="kvcached", attention="triton", step_tokens=16
        )
        engine._runner.model.use_fused_ops = fused
        engine.start()
        try:
            ref = ReferenceLlama(model_dirs[arch])
            reqs = [greedy(p, 30, f"{arch}{i}") for i, p in enumerate(PROMPTS)]
            outs = await asyncio.gather(*(tokens_of(engine, r) for r in reqs))
            for req, out in zip(reqs, outs):
                assert out == ref.greedy(engine.tokenize_prompt(req), 30), req.request_id
            assert engine._runner.model.use_fused_ops is fused and engine._runner.graph_runner is not None
            assert engine._runner.graph_runner._graphs
        finally:
            engine.stop()


async def test_workers_sharing_host_weights_pin_them_each_and_match_the_reference(model_dirs):
    """Two worker processes on the GPU at once: the first writes the model's host
    weights into a shared-memory file, the second maps and pins the same pages
    (cudaHostRegister) instead of loading; both serve the reference's tokens,
    across reactivation (which copies from the shared pages)."""
    # In memory, as the agent requires: CUDA cannot pin a disk file's pages.
    shm = Path(tempfile.mkdtemp(prefix="prism-test-", dir=default_shared_dir()))
    path = str(shm / "llama.weights")
    ref, tokenizer = ReferenceLlama(model_dirs["llama"]), Tokenizer(model_dirs["llama"])
    pool = WorkerPool(["cuda:0"], spares_per_device=0)
    await pool.start()
    engines = []
    try:
        for _ in range(2):
            worker = await pool.acquire("cuda:0")
            engines.append(
                await RemoteEngine.load(
                    worker, model_dirs["llama"], name="llama", dtype="float32", shared_weights_path=path
                )
            )
        writer, mapper = engines
        assert writer.weights_shared and not writer.weights_attached and mapper.weights_attached
        for engine in engines:
            for round_ in range(2):
                reqs = [greedy(p, 12, f"sh{round_}-{i}") for i, p in enumerate(PROMPTS)]
                outs = await asyncio.gather(*(tokens_of(engine, r) for r in reqs))
                for req, out in zip(reqs, outs):
                    assert out == ref.greedy(tokenizer.encode(req.prompt), 12), req.request_id
                await engine.deactivate()
                assert (await engine.activate()).copy_gbps > 0
    finally:
        for engine in engines:
            await engine.stop()
        await pool.close()
        shutil.rmtree(shm, ignore_errors=True)
