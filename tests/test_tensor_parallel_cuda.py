"""Tensor parallelism on two GPUs: NCCL all-reduces inside the forward (the
fused kernels' path on rank 0 and its follower), the step channel on a gloo
group beside it, and both ranks' weights switched off and on. Skipped without two CUDA devices (CI); run on the GPU host
with `source .device/setup-kvcached.sh .device`."""

from __future__ import annotations

import asyncio
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from prism.tiny_models import write_tiny_model
from services.gpu_agent.engine import Engine
from services.gpu_agent.engine.shard_follower import StepChannel, follow
from services.gpu_agent.engine.tensor_parallel import TensorParallel
from tests.test_tensor_parallel import _free_port, _generate_all

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                reason="needs two CUDA devices")


def _rank(rank: int, port: int, model_dir: Path, results) -> None:
    try:
        torch.cuda.set_device(rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=timedelta(seconds=60), device_id=torch.device("cuda", rank))
        tp = TensorParallel(rank, 2)
        channel = StepChannel(tp, dist.new_group(backend="gloo"))  # step inputs stay in host memory
        if rank == 1:
            results.put((rank, follow(model_dir, tp, channel, dtype="float32", device="cuda:1")))
            return
        engine = Engine(model_dir, dtype="float32", device="cuda:0", kv_pool="pages", step_tokens=8,
                        tensor_parallel=tp, step_channel=channel)
        engine.start()
        try:
            first = asyncio.run(_generate_all(engine))
            engine.deactivate()  # both GPUs' weights to host memory and back
            timing = engine.activate()
            results.put((rank, [first, asyncio.run(_generate_all(engine)), timing.total_s]))
        finally:
            engine.stop()
    except BaseException:
        results.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_two_gpu_engine_generates_what_a_one_gpu_engine_does_and_again_after_switching(tmp_path):
    model_dir = write_tiny_model(tmp_path / "llama")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, model_dir, results)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = dict(results.get(timeout=300) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert isinstance(got[0], list), f"rank 0 failed:\n{got[0]}"
    assert isinstance(got[1], int), f"rank 1 failed:\n{got[1]}"
    single = Engine(model_dir, dtype="float32", device="cuda:0", kv_pool="pages", step_tokens=8)
    single.start()
    try:
        expected = asyncio.run(_generate_all(single))
    finally:
        single.stop()
    assert got[0][:2] == [expected, expected]  # before switching off, and after switching on again
    assert got[0][2] > 0
    assert got[1] > 10
