"""Tensor parallelism (services/gpu_agent/engine/tensor_parallel.py): how
parameters are cut, and the split model's logits against the whole model's,
with real ranks (two processes, torch.distributed over gloo on the CPU; NCCL
on GPUs is the same code)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from prism.cluster import LocalCluster
from prism.tiny_models import write_tiny_model
from prism_client.v1 import engine_worker_pb2 as wpb
from services.gpu_agent.devices import Device
from services.gpu_agent.engine import Engine, GenerationRequest
from services.gpu_agent.engine.errors import EngineError
from services.gpu_agent.engine.kv_pool import KVGeometry, PagePool
from services.gpu_agent.engine.model_config import load_model_config
from services.gpu_agent.engine.paged_attention import build_step_attention
from services.gpu_agent.engine.shard_follower import StepChannel, follow, join_ranks
from services.gpu_agent.engine.tensor_parallel import (
    TensorParallel,
    TensorParallelError,
    check_divisible,
    full_shape,
    shard_of,
    split_dim,
)
from services.gpu_agent.engine.weights import load_model
from services.gpu_agent.engine_manager import EngineManager, EngineSpec, PlacementError
from services.gpu_agent.workers.remote_engine import RemoteEngine
from services.gpu_agent.workers.worker_pool import WorkerPool


def test_each_parameter_kind_is_cut_along_its_dimension():
    full = torch.arange(24.0).reshape(4, 6)
    assert split_dim("model.layers.0.self_attn.q_proj.weight") == 0
    assert split_dim("model.layers.3.mlp.down_proj.weight") == 1
    assert split_dim("model.embed_tokens.weight") is None
    assert split_dim("model.layers.0.input_layernorm.weight") is None
    rank1 = TensorParallel(1, 2)
    assert torch.equal(shard_of("model.layers.0.mlp.up_proj.weight", full, rank1), full[2:])
    assert torch.equal(shard_of("model.layers.0.self_attn.o_proj.weight", full, rank1), full[:, 3:])
    # the vocabulary: a block of rows each where the ranks divide it, whole where they do not
    assert torch.equal(shard_of("lm_head.weight", full, rank1), full[2:])
    assert torch.equal(shard_of("model.embed_tokens.weight", full, rank1), full[2:])
    assert torch.equal(shard_of("model.embed_tokens.weight", full[:3], rank1), full[:3])
    assert full_shape("model.embed_tokens.weight", torch.Size([2, 6]), rank1, vocab_size=4) == (4, 6)
    assert full_shape("model.layers.0.self_attn.o_proj.weight", torch.Size([4, 3]), rank1, vocab_size=4) == (4, 6)
    bias = torch.ones(6)
    # a row-parallel bias is added once, after the ranks' parts are summed
    assert torch.equal(shard_of("model.layers.0.self_attn.o_proj.bias", bias, TensorParallel(0, 2)), bias)
    assert torch.equal(shard_of("model.layers.0.self_attn.o_proj.bias", bias, rank1), torch.zeros(6))
    assert torch.equal(shard_of("model.layers.0.self_attn.k_proj.bias", bias, rank1), bias[3:])


def test_a_model_that_does_not_split_evenly_is_refused(tmp_path):
    config = load_model_config(write_tiny_model(tmp_path / "m"))  # 4 heads, 2 KV heads
    check_divisible(config, 2)
    with pytest.raises(TensorParallelError, match="key/value heads"):
        check_divisible(config, 4)
    with pytest.raises(TensorParallelError, match="rank 2 of 2"):
        TensorParallel(2, 2)


def run_ranks(target, *args, size: int = 2, timeout_s: float = 120) -> dict[int, object]:
    """target(rank, port, *args, results) in a spawned process per rank, meeting at
    port; each puts (rank, result) on results. Returns the results by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=target, args=(rank, port, *args, results)) for rank in range(size)]
    for p in procs:
        p.start()
    try:
        return dict(results.get(timeout=timeout_s) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _logits(model, kv_heads: int, prompt: list[int]) -> list[torch.Tensor]:
    """A prefill of the prompt, then one decode step: the logits of both."""
    cfg = model.config
    pool = PagePool(
        KVGeometry(cfg.num_hidden_layers, kv_heads, cfg.head_dim, model.dtype), 64, 1 << 30, page_bytes=4096
    )
    slots = pool.alloc(len(prompt) + 1)
    out = []
    with torch.inference_mode():
        n = len(prompt)
        step = build_step_attention([(0, n, slots[:n])], 0, torch.device("cpu"))
        out.append(model(torch.tensor(prompt), torch.arange(n), pool, step, torch.tensor([n - 1])))
        step = build_step_attention([(n, 1, slots)], 1, torch.device("cpu"))
        out.append(model(torch.tensor([300]), torch.tensor([n]), pool, step, torch.tensor([0])))
    return out


def _rank(rank: int, port: int, variants: list[tuple[str, Path, str]], results) -> None:
    """Each variant (name, model folder, load format) on one process group: the ranks' start
    (spawn, torch's import) is most of the time, so it is paid once."""
    torch.set_num_threads(1)
    compared = {}
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
        )
        for name, model_dir, load_format in variants:
            try:
                compared[name] = _compare(rank, 2, model_dir, load_format)
            except BaseException:  # the test reads a result from every rank: never leave it waiting
                compared[name] = (None, traceback.format_exc())
    except BaseException:
        compared = {name: (None, traceback.format_exc()) for name, _, _ in variants}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    results.put((rank, compared))


def _compare(rank: int, size: int, model_dir: Path, load_format: str) -> tuple[list[float], list[float]]:
    """Rank `rank`'s logits against the whole model's: (largest difference, largest logit) per forward."""
    config = load_model_config(model_dir)
    prompt = [3, 14, 15, 392, 65, 511, 89, 279]  # tokens in both halves of a split vocabulary
    whole = load_model(config, model_dir, load_format, torch.float32, "cpu", seed=5)
    expected = _logits(whole, config.num_key_value_heads, prompt)
    tp = TensorParallel(rank, size)
    split = load_model(config, model_dir, load_format, torch.float32, "cpu", seed=5, tp=tp)
    assert split.model.layers[0].self_attn.num_heads == config.num_attention_heads // size
    assert split.model.layers[0].mlp.gate_proj.weight.shape[0] == config.intermediate_size // size
    assert split.vocab_split and split.lm_head.weight.shape[0] == config.vocab_size // size
    assert split.model.embed_tokens.weight.shape[0] == config.vocab_size // size
    assert torch.equal(split.model.embed_tokens.weight, whole.model.embed_tokens.weight.chunk(size)[rank])
    got = _logits(split, config.num_key_value_heads // size, prompt)
    return [(g - e).abs().max().item() for g, e in zip(got, expected)], [e.abs().max().item() for e in expected]


def test_two_ranks_give_the_whole_models_logits(tmp_path):
    # qwen2 has q/k/v biases (cut with their heads); "auto" reads the checkpoint and cuts it,
    # "dummy" draws each whole matrix from its seed and keeps the rank's part.
    variants = [
        (f"{arch}-{load_format}", write_tiny_model(tmp_path / arch, arch=arch), load_format)
        for arch, load_format in [("llama", "auto"), ("qwen2", "auto"), ("llama", "dummy")]
    ]
    got = run_ranks(_rank, variants)
    assert sorted(got) == [0, 1]
    for rank, compared in got.items():
        assert sorted(compared) == sorted(name for name, _, _ in variants)
        for name, (diffs, scales) in compared.items():
            assert diffs is not None, f"{name}, rank {rank} failed:\n{scales}"
            for diff, scale in zip(diffs, scales):
                assert scale > 0
                assert diff <= 1e-5 * max(1.0, scale), f"{name}, rank {rank}: logits differ by {diff}"


PROMPTS = ["Hello world", "The cache of the model is", "1 2 3 4 5 6 7 8 9 10 11 12", "a", "x y z " * 9]


def serve_split(rank: int, port: int, model_dir: Path, device_kind: str, results) -> None:
    """Rank `rank` of a model split in two, joined as the agent's workers join
    (join_ranks: gloo on the CPU; NCCL with a gloo step channel on CUDA): rank 1
    follows and reports its forwards; rank 0 serves PROMPTS, switches off and on,
    serves them again, and reports both and the activation's seconds."""
    try:
        torch.set_num_threads(1)
        device = "cpu"
        if device_kind == "cuda":
            torch.cuda.set_device(rank)
            device = f"cuda:{rank}"
        tp, channel = join_ranks(rank, 2, f"tcp://127.0.0.1:{port}", device, timeout_s=60)
        if rank == 1:
            results.put((rank, follow(model_dir, tp, channel, dtype="float32", device=device)))
            return
        # step_tokens 8: prompts are cut into chunks, and chunks share steps with decoding sequences
        # 16 tokens a page of this rank's KV: a limit of a few pages is one to preempt under
        engine = Engine(
            model_dir,
            dtype="float32",
            device=device,
            kv_pool="pages",
            step_tokens=8,
            kv_page_bytes=1024,
            tensor_parallel=tp,
            step_channel=channel,
        )
        engine.start()
        preemptions = _PreemptionCount()
        engine_log = logging.getLogger("services.gpu_agent.engine.engine")
        engine_log.setLevel(logging.INFO)
        engine_log.addHandler(preemptions)
        try:
            first = asyncio.run(_generate_all(engine))
            engine.deactivate()  # every rank switches off and on with it
            timing = engine.activate()
            second = asyncio.run(_generate_all(engine))
            # The prompts again: their prefixes come from the cache (a sequence's slots begin anew, and
            # reach the other rank whole); then under a limit of 80 tokens (the longest needs 67), where
            # they preempt each other.
            cached = asyncio.run(_generate_all(engine))
            hits = engine.stats().prefix_cache_hit_tokens
            engine.set_memory_limit(80 * engine.kv_bytes_per_token)
            squeezed = asyncio.run(_generate_all(engine))
            results.put((rank, [first, second, timing.total_s, cached, hits, squeezed, preemptions.count]))
        finally:
            engine.stop()
    except BaseException:
        results.put((rank, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class _PreemptionCount(logging.Handler):
    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += record.getMessage().startswith("preempted")


def one_rank_tokens(model_dir: Path, **engine_args) -> list[list[int]]:
    """What one unsplit engine generates for PROMPTS (greedy)."""
    single = Engine(model_dir, dtype="float32", **engine_args)
    single.start()
    try:
        return asyncio.run(_generate_all(single))
    finally:
        single.stop()


async def _generate_all(engine: Engine) -> list[list[int]]:
    async def one(i: int, prompt: str) -> list[int]:
        req = GenerationRequest(f"r{i}", prompt=prompt, max_tokens=12, temperature=0.0, ignore_eos=True)
        return [t async for out in engine.generate(req) for t in out.token_ids]

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(PROMPTS))))


def test_a_two_rank_engine_generates_what_a_one_rank_engine_does_and_again_after_switching(tmp_path):
    model_dir = write_tiny_model(tmp_path / "llama")
    expected = one_rank_tokens(model_dir, step_tokens=8)
    got = run_ranks(serve_split, model_dir, "cpu")
    assert isinstance(got[0], list), f"rank 0 failed:\n{got[0]}"
    assert isinstance(got[1], int), f"rank 1 failed:\n{got[1]}"
    assert got[0][:2] == [expected, expected]  # before switching off, and after switching on again
    _, _, _, cached, hits, squeezed, preemptions = got[0]
    assert cached == expected and hits > 0  # prefixes from the cache
    assert squeezed == expected and preemptions > 0  # sequences preempted and recomputed
    assert got[1] > 2 * len(PROMPTS)  # the follower ran the steps: chunked prefills and decoding


def test_an_engine_and_its_step_channel_come_together():
    with pytest.raises(EngineError, match="step channel"):
        Engine("unused", tensor_parallel=TensorParallel(0, 2))
    with pytest.raises(EngineError, match="only tensor-parallel rank 0"):
        Engine("unused", tensor_parallel=TensorParallel(1, 2), step_channel=StepChannel(TensorParallel(1, 2)))


async def _split_over_two_workers(pool: WorkerPool, model_dir: Path):
    """The agent's way: one engine worker per rank, loaded at once. Returns the workers, rank 0's
    engine and rank 1's follower."""
    workers = [await pool.acquire("cpu") for _ in range(2)]
    rendezvous = f"tcp://127.0.0.1:{_free_port()}"
    specs = [wpb.TensorParallelSpec(rank=r, size=2, rendezvous=rendezvous) for r in range(2)]
    engine, follower = await asyncio.wait_for(
        asyncio.gather(
            RemoteEngine.load(workers[0], str(model_dir), name="split", dtype="float32", tensor_parallel=specs[0]),
            RemoteEngine.load_shard_follower(
                workers[1], str(model_dir), name="split", dtype="float32", tensor_parallel=specs[1]
            ),
        ),
        120,
    )
    return workers, engine, follower


async def test_two_workers_serve_one_model_split_over_them(tmp_path):
    # The agent's way: one engine worker per rank, loaded at once; rank 0's worker takes the requests,
    # rank 1's follows its steps and refuses requests of its own.
    model_dir = write_tiny_model(tmp_path / "llama")
    single = Engine(model_dir, dtype="float32")  # the workers' engines take the default step budget too
    single.start()
    try:
        expected = await _generate_all(single)
        whole_bytes = single.weight_bytes
    finally:
        single.stop()
    pool = WorkerPool(["cpu"], spares_per_device=0)
    await pool.start()
    try:
        workers, engine, follower = await _split_over_two_workers(pool, model_dir)
        # each rank: its share of the layers, and the embeddings, norms and LM head whole
        assert follower.weight_bytes == engine.weight_bytes < whole_bytes
        got = await asyncio.wait_for(_generate_all(engine), 60)
        assert got == expected
        with pytest.raises(grpc.aio.AioRpcError, match="rank 1 of a model"):
            await workers[1].stub.Stats(wpb.EngineStatsRequest(), timeout=10)
        await engine.deactivate()
        await engine.activate()
        assert await asyncio.wait_for(_generate_all(engine), 60) == got
        await engine.stop()
    finally:
        await pool.close()


@pytest.mark.parametrize("failing_rank", [0, 1])
async def test_a_step_failing_on_one_rank_fails_the_split_engine_on_every_rank_within_seconds(
    tmp_path, monkeypatch, failing_rank
):
    # tests/faults/sitecustomize.py makes the workers' 40th all-reduce on one rank raise, mid-forward:
    # the other rank is left inside that forward. Every request ends with an error (none hangs), both
    # workers end, and the engine is reported lost, within seconds, not the process group's timeout.
    model_dir = write_tiny_model(tmp_path / "llama")
    faults = Path(__file__).parent / "faults"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(faults), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("PRISM_TEST_FAIL_ALL_REDUCE", f"{failing_rank}:40")
    pool = WorkerPool(["cpu"], spares_per_device=0)
    await pool.start()
    try:
        workers, engine, _ = await _split_over_two_workers(pool, model_dir)
        engine.add_followers(workers[1:])
        lost: list[Exception] = []

        async def on_lost(error: Exception) -> None:
            lost.append(error)

        engine.on_lost(on_lost)

        async def one(i: int) -> Exception | None:
            req = GenerationRequest(
                f"r{i}", prompt=PROMPTS[i % len(PROMPTS)], max_tokens=48, temperature=0.0, ignore_eos=True
            )
            try:
                async for _ in engine.generate(req):
                    pass
            except EngineError as exc:
                return exc
            return None

        started = time.monotonic()
        errors = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(4))), 30)
        assert all(isinstance(e, EngineError) for e in errors), errors
        if failing_rank == 0:  # rank 0's own error reaches its requests before its worker ends
            assert all(
                "injected failure of all-reduce 40 on rank 0" in str(e) and "split engine has failed" in str(e)
                for e in errors
            ), errors
        await asyncio.wait_for(asyncio.gather(*(w.exited.wait() for w in workers)), 30)
        while not lost and time.monotonic() - started < 30:  # the listeners run once the exit is seen
            await asyncio.sleep(0.05)
        assert len(lost) == 1 and "exit code 70" in str(lost[0]), lost
        with pytest.raises(EngineError):
            await engine.generate(GenerationRequest("after", prompt=PROMPTS[0], max_tokens=2)).__anext__()
        await engine.stop()
    finally:
        await pool.close()


async def test_the_agents_engine_manager_loads_a_model_split_over_two_devices(tmp_path):
    # tp_size 2 on GPUs 0 and 1 (two CPU devices here): a worker per rank; the model serves as one engine
    # would, switches off and on, and its unload ends both workers. When a rank's worker dies, the
    # engine is reported failed (its steps would wait for that rank), and rank 0's worker is ended too.
    model_dir = write_tiny_model(tmp_path / "llama")
    expected = await asyncio.to_thread(one_rank_tokens, model_dir)

    async def publish(managed):
        pass

    pool = WorkerPool(["cpu"], spares_per_device=0)
    await pool.start()
    devices = [Device(0, "cpu", "cpu", 1 << 30), Device(1, "cpu", "cpu", 1 << 30)]
    manager = EngineManager(devices, publish, pool)
    try:
        spec = EngineSpec(name="split", path=str(model_dir), tp_size=2, dtype="float32")
        managed = await asyncio.wait_for(manager.load(spec, (0, 1), activate=True, memory_limit_bytes=0), 120)
        assert managed.state == "active", managed.error
        engine = managed.engine
        assert await asyncio.wait_for(_generate_all(engine), 60) == expected
        await manager.deactivate("split")
        await manager.activate("split")
        assert await asyncio.wait_for(_generate_all(engine), 60) == expected
        workers = [engine.worker, *engine._followers]
        await asyncio.wait_for(manager.unload("split"), 60)
        assert not any(w.alive for w in workers)

        managed = await asyncio.wait_for(manager.load(spec, (0, 1), activate=True, memory_limit_bytes=0), 120)
        engine = managed.engine
        engine._followers[0].kill()
        await asyncio.wait_for(engine.worker.exited.wait(), 30)
        for _ in range(100):
            if managed.state == "failed":
                break
            await asyncio.sleep(0.1)
        assert managed.state == "failed" and "another tensor-parallel rank died" in managed.error
    finally:
        await pool.close()


async def test_every_device_of_a_split_model_counts_its_weights_and_fixed_kv(tmp_path):
    # The memory coordinators of an agent with two devices: a model split over both keeps the KV
    # reservation it was loaded with (its ranks' page pools are allocated whole), and each device
    # counts its shard of the weights and that reservation as taken, so the model planned beside it
    # on device 1 only gets what is left there. Switched off, the split model frees both devices.
    from services.gpu_agent.engine.errors import CapacityError
    from services.gpu_agent.memory_coordinator import MemoryCoordinator, prepare_activation_on

    model_dir = write_tiny_model(tmp_path / "llama")

    async def publish(managed):
        pass

    pool = WorkerPool(["cpu"], spares_per_device=0)
    await pool.start()
    memory = 64 << 20
    devices = [Device(0, "cpu", "cpu", memory), Device(1, "cpu", "cpu", memory)]
    manager = EngineManager(devices, publish, pool, coordinated=True)
    coordinators = {d.index: MemoryCoordinator(d, manager, reserve_bytes=0) for d in devices}

    async def before_activate(managed):
        await prepare_activation_on([coordinators[gpu] for gpu in managed.gpu_ids], managed)

    manager.before_activate = before_activate
    reservation = 8 << 20
    try:
        split_spec = EngineSpec(name="split", path=str(model_dir), tp_size=2, dtype="float32")
        split = await asyncio.wait_for(manager.load(split_spec, (0, 1), True, memory_limit_bytes=reservation), 120)
        one = await asyncio.wait_for(
            manager.load(
                EngineSpec(name="one", path=str(model_dir), dtype="float32"), (1,), True, memory_limit_bytes=0
            ),
            120,
        )
        assert split.state == one.state == "active", (split.error, one.error)
        assert split.fixed_kv and not one.fixed_kv
        for c in coordinators.values():
            await c.rebalance()
        shard, whole = split.engine.weight_bytes, one.engine.weight_bytes
        assert split.memory_limit_bytes == reservation  # not ballooned
        device1 = coordinators[1].snapshot()
        assert [e.model for e in device1.engines] == ["one"]  # only the unsplit model is planned there
        assert device1.budget_bytes == memory - shard - reservation - whole
        assert 0 < one.memory_limit_bytes <= device1.budget_bytes
        report = coordinators[1].memory_split()
        assert {e.model for e in report.engines} == {"split", "one"}
        assert report.weight_bytes == shard + whole
        assert report.kv_limit_bytes == reservation + one.memory_limit_bytes
        assert report.free_bytes == report.kv_budget_bytes - report.kv_limit_bytes >= 0
        assert coordinators[0].snapshot().engines == ()  # device 0 plans nothing: the split model's KV is fixed
        # The split model's demand (here 1 MiB its admission holds back) is counted on its first device only.
        for c in coordinators.values():
            c.pending_demand_bytes = lambda model: (1 << 20) if model == "split" else 0
        demand = {i: {e.model: e.kv_demand_bytes for e in c.memory_split().engines} for i, c in coordinators.items()}
        assert demand[0]["split"] == 1 << 20 and demand[1]["split"] == 0
        for c in coordinators.values():
            c.pending_demand_bytes = lambda model: 0
        assert not await coordinators[0].grant(split, 1 << 20)  # nor does admission grow it
        assert coordinators[0].most_kv_bytes(split) == reservation

        await manager.deactivate("split")
        await coordinators[1].rebalance()
        assert coordinators[1].snapshot().budget_bytes == memory - whole
        await manager.activate("split")
        assert split.memory_limit_bytes == reservation
        assert coordinators[1].snapshot().budget_bytes == memory - shard - reservation - whole

        # Switching the split model on where device 0 could make room (an idle model there steps
        # aside) but device 1 cannot: refused, and nothing was switched off on device 0 for it.
        zero = await asyncio.wait_for(
            manager.load(
                EngineSpec(name="zero", path=str(model_dir), dtype="float32"), (0,), True, memory_limit_bytes=0
            ),
            120,
        )
        await manager.deactivate("split")
        tight = [
            MemoryCoordinator(
                Device(0, "cpu", "cpu", zero.engine.weight_bytes + shard + reservation - 1), manager, reserve_bytes=0
            ),
            MemoryCoordinator(Device(1, "cpu", "cpu", shard + reservation - 1), manager, reserve_bytes=0),
        ]
        assert tight[0].room_to_activate(split) == ["zero"] and tight[1].room_to_activate(split) is None
        with pytest.raises(CapacityError, match="do not fit on device 1"):
            await prepare_activation_on(tight, split)
        assert zero.state == "active"
    finally:
        await manager.stop_all()
        await pool.close()


async def test_an_agent_without_workers_refuses_a_split_model(tmp_path):
    async def publish(managed):
        pass

    manager = EngineManager([Device(0, "cpu", "cpu", 1 << 30), Device(1, "cpu", "cpu", 1 << 30)], publish)
    spec = EngineSpec(name="split", path=str(tmp_path), tp_size=2, engine="torch")
    with pytest.raises(PlacementError, match="needs engine workers"):
        await manager.load(spec, (0, 1), activate=True, memory_limit_bytes=0)


def test_a_local_cluster_serves_a_model_split_over_two_cpu_devices(tmp_path):
    # The whole path on a laptop: the placement config's tp_size 2, an agent with two CPU devices and
    # engine workers, the prism policy placing it on GPU ids [0, 1] beside an unsplit model, and
    # completions through the gateway's REST API: the split model's text is what one unsplit engine
    # writes. The agent reports the split model on both devices, with its KV reservation counted there.
    import httpx

    from prism_client.v1 import agent_pb2, agent_pb2_grpc

    model_dir = write_tiny_model(tmp_path / "llama")
    prompt = PROMPTS[1]
    single = Engine(model_dir, dtype="float32")
    single.start()
    try:

        async def text_of_one() -> str:
            req = GenerationRequest("one", prompt=prompt, max_tokens=10, temperature=0.0, ignore_eos=True)
            return "".join([out.text async for out in single.generate(req)])

        expected = asyncio.run(text_of_one())
    finally:
        single.stop()
    config = {
        "policy": "prism",
        "models": [
            {
                "model_name": "split",
                "model_path": str(model_dir),
                "tp_size": 2,
                "dtype": "float32",
                "init_placements": [{"gpu_ids": [0, 1]}],
            },
            {
                "model_name": "whole",
                "model_path": str(model_dir),
                "dtype": "float32",
                "init_placements": [{"gpu_ids": [1]}],
            },
        ],
    }
    config_path = tmp_path / "models.json"
    config_path.write_text(json.dumps(config))
    cluster = LocalCluster(
        state_dir=tmp_path / "state",
        config_path=config_path,
        http_port=_free_port(),
        grpc_port=_free_port(),
        device="cpu",
        cpu_memory_gb=1.0,
        engine_isolation="process",
        agent_args=("--cpu-devices", "2", "--spare-workers", "0"),
        scheduler_args=("--replan-interval-s", "0.5"),
    )
    cluster.start()
    try:
        for model in ("split", "whole"):
            reply = httpx.post(
                f"{cluster.http_url}/v1/completions",
                timeout=120,
                json={"model": model, "prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True},
            )
            assert reply.status_code == 200, reply.text
            body = reply.json()
            assert body["choices"][0]["text"] == expected  # the same weights, split or not
            assert body["usage"]["completion_tokens"] == 10
        with grpc.insecure_channel(cluster.agent_address) as channel:
            status = agent_pb2_grpc.AgentStub(channel).GetStatus(agent_pb2.GetStatusRequest(), timeout=10)
        engines = {e.model: e for e in status.engines}
        assert list(engines["split"].gpu_ids) == [0, 1]
        for gpu in status.gpus:
            rows = {e.model: e for e in gpu.engines}
            assert "split" in rows and rows["split"].weight_bytes > 0
            if rows["split"].active:
                assert rows["split"].kv_limit_bytes == engines["split"].memory_limit_bytes > 0
            assert gpu.free_bytes == gpu.kv_budget_bytes - gpu.kv_limit_bytes >= 0
    finally:
        cluster.stop()
