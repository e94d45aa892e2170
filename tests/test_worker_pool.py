"""Engines in worker processes (services/gpu_agent/workers/), on the CPU with
real processes and a tiny model: the pool's warm spares, RemoteEngine's
parity with the reference forward pass and with the engine's semantics over
the wire, and what happens when a worker dies or its agent does.

One pool and one loaded engine serve the module (one event loop for all of
it), so the module starts only a handful of processes."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from pathlib import Path

import pytest
import pytest_asyncio

from prism.tiny_models import write_tiny_model
from services.gpu_agent.devices import Device
from services.gpu_agent.engine import (
    EngineError,
    EngineInactiveError,
    GenerationRequest,
    InvalidRequestError,
    Tokenizer,
)
from services.gpu_agent.engine.host_weights import ActivationTiming
from services.gpu_agent.engine_manager import (
    EngineManager,
    EngineNotReadyError,
    EngineSpec,
    ManagedEngine,
)
from services.gpu_agent.workers.errors import WorkerLostError, WorkerStartError
from services.gpu_agent.workers.remote_engine import RemoteEngine
from services.gpu_agent.workers.worker_pool import WorkerPool
from tests.reference_llama import ReferenceLlama

pytestmark = pytest.mark.asyncio(loop_scope="module")

PROMPTS = ["Hello world", "The cache of the model is", "1 2 3 4 5 6 7 8"]
NEW_TOKENS = 10
HANG_GUARD_S = 60  # only so that a bug fails the test instead of hanging it


def greedy(prompt: str, max_tokens: int = NEW_TOKENS, request_id: str = "w-test") -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id, prompt=prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True
    )


async def tokens_of(engine: RemoteEngine, req: GenerationRequest) -> list[int]:
    return [t async for out in engine.generate(req) for t in out.token_ids]


def process_environ(pid: int) -> dict[str, str]:
    """The environment a process was started with (Linux)."""
    items = Path(f"/proc/{pid}/environ").read_text().split("\0")
    return dict(item.split("=", 1) for item in items if "=" in item)


async def eventually(check, what: str, timeout_s: float = HANG_GUARD_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by a parent) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("workers") / "llama", arch="llama")


@pytest.fixture(scope="module")
def reference(model_dir) -> ReferenceLlama:
    return ReferenceLlama(model_dir)


@pytest.fixture(scope="module")
def tokenizer(model_dir) -> Tokenizer:
    return Tokenizer(model_dir)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool():
    pool = WorkerPool(["cpu"], spares_per_device=1, stop_timeout_s=10)
    await pool.start()
    yield pool
    await pool.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def loaded(pool, model_dir):
    """(the spare pid seen before any load, the engine loaded into an acquired worker)."""
    [spare] = pool.spares("cpu")
    worker = await asyncio.wait_for(pool.acquire("cpu"), HANG_GUARD_S)
    engine = await asyncio.wait_for(RemoteEngine.load(worker, model_dir, name="tiny-llama"), HANG_GUARD_S)
    yield spare.pid, engine
    await engine.stop()


@pytest.fixture()
def engine(loaded) -> RemoteEngine:
    return loaded[1]


# ---- the pool ----------------------------------------------------------------------------


async def test_a_load_is_served_by_the_prestarted_spare_and_a_replacement_appears(pool, loaded):
    spare_pid, engine = loaded
    assert engine.pid == spare_pid  # the worker that was warming up before any model was asked for
    info = engine.worker.info
    assert info.pid == spare_pid and info.device == "cpu" and info.warmup_s >= 0 and info.import_s > 0
    assert engine.worker.start_s is not None
    [replacement] = pool.spares("cpu")
    assert replacement.pid != spare_pid and replacement.alive
    replacement_info = await asyncio.wait_for(replacement.wait_ready(), HANG_GUARD_S)
    assert not replacement_info.model_loaded
    assert engine.max_context == 256 and engine.weight_bytes > 0
    # The worker's kvcached runs without its own memory headroom (the agent's reserve is the headroom;
    # services/gpu_agent/kvcached_env.py), in a KV accounting segment no other worker shares.
    spare_env, replacement_env = process_environ(spare_pid), process_environ(replacement.pid)
    assert spare_env["KVCACHED_GPU_UTILIZATION"] == "1.0"
    assert spare_env["KVCACHED_IPC_NAME"] != replacement_env["KVCACHED_IPC_NAME"]


async def test_without_spares_a_load_starts_a_fresh_worker_and_close_ends_it():
    cold = WorkerPool(["cpu"], spares_per_device=0)
    await cold.start()
    try:
        assert cold.spares("cpu") == [] and cold.workers == []
        worker = await asyncio.wait_for(cold.acquire("cpu"), HANG_GUARD_S)
        assert worker.ready and worker.alive and cold.spares("cpu") == []
        with pytest.raises(ValueError, match="no device 'cuda:0'"):
            await cold.acquire("cuda:0")
    finally:
        await cold.close()
    assert not worker.alive and not pid_alive(worker.pid)
    assert not cold.socket_dir.exists()


async def test_a_worker_that_cannot_use_its_device_fails_to_start_with_a_clear_error():
    pool = WorkerPool(["cuda:99"], spares_per_device=0)
    try:
        with pytest.raises(WorkerStartError, match=r"exited before it was ready \(exit code 2\)"):
            await asyncio.wait_for(pool.acquire("cuda:99"), HANG_GUARD_S)
    finally:
        await pool.close()


# ---- RemoteEngine: the engine's semantics over the wire -----------------------------------


async def test_greedy_tokens_equal_the_reference_alone_and_batched(engine, reference, tokenizer):
    reqs = [greedy(p, NEW_TOKENS + 3 * i, f"g{i}") for i, p in enumerate(PROMPTS)]
    expected = [reference.greedy(tokenizer.encode(r.prompt), r.max_tokens) for r in reqs]
    assert [await tokens_of(engine, r) for r in reqs] == expected
    assert list(await asyncio.gather(*(tokens_of(engine, r) for r in reqs))) == expected
    outs = [o async for o in engine.generate(reqs[0])]
    assert outs[-1].finish_reason == "length" and all(o.finish_reason is None for o in outs[:-1])
    assert outs[-1].completion_tokens == NEW_TOKENS and outs[-1].prompt_tokens == len(tokenizer.encode(PROMPTS[0]))
    chat = GenerationRequest(
        request_id="chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0.0, ignore_eos=True
    )
    assert await tokens_of(engine, chat) == reference.greedy(tokenizer.encode_chat(chat.messages), 6)


async def test_invalid_requests_raise_the_engines_errors(engine):
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        await tokens_of(engine, greedy("Hello", max_tokens=0))
    with pytest.raises(InvalidRequestError, match="over the model's context"):
        await tokens_of(engine, greedy("Hello " * 300))
    with pytest.raises(InvalidRequestError, match="not both"):
        await tokens_of(engine, GenerationRequest("x", prompt="a", messages=[{"role": "user", "content": "b"}]))


async def test_cancelling_streams_frees_their_kv(engine):
    streams = [engine.generate(greedy(p, 200, f"c{i}")) for i, p in enumerate(PROMPTS)]
    for stream in streams:
        await stream.__anext__()
    busy = await engine.refresh_stats()
    assert busy.kv_used_bytes > 0 and busy.running_requests + busy.queued_requests == len(PROMPTS)
    assert busy.kv_held_bytes >= busy.kv_used_bytes  # the pages the slots are on, across the process boundary
    for stream in streams:
        await stream.aclose()

    def idle() -> bool:
        s = engine.stats()  # refreshed in the background
        return s.kv_used_bytes == 0 and s.kv_held_bytes == 0 and s.running_requests == 0 and s.queued_requests == 0

    await eventually(idle, "the cancelled requests to free their KV")
    # a consumer task cancelled mid-stream frees its KV too. It holds after its first token: polling the
    # stats for the request running raced the tiny model, whose 200 tokens could end between two refreshes.
    first_token = asyncio.Event()

    async def consume_and_hold() -> None:
        async for _ in engine.generate(greedy("Hello", 200, "cancelled")):
            first_token.set()
            await asyncio.Event().wait()  # mid-stream until cancelled

    task = asyncio.create_task(consume_and_hold())
    await asyncio.wait_for(first_token.wait(), HANG_GUARD_S)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(idle, "the cancelled task's request to free its KV")


async def test_memory_limit_revisions_over_the_wire(engine):
    base = engine.stats().memory_limit_revision
    applied = await engine.set_memory_limit(1 << 20, revision=base + 5)
    assert applied.status == "applied" and applied.limit_bytes == 1 << 20 and applied.revision == base + 5
    stale = await engine.set_memory_limit(1 << 21, revision=base + 4)
    assert stale.status == "stale" and stale.limit_bytes == 1 << 20
    assert (await engine.set_memory_limit(1 << 21, revision=base + 5)).status == "conflict"
    s = engine.stats()  # fresh: set_memory_limit refreshes before it returns
    assert s.memory_limit_bytes == 1 << 20 and s.memory_limit_revision == base + 5
    assert (await engine.set_memory_limit(1 << 21)).revision == base + 6  # None: the next revision
    assert engine.stats().memory_limit_bytes == 1 << 21
    with pytest.raises(InvalidRequestError, match="non-negative"):
        await engine.set_memory_limit(-1)


async def test_deactivate_activate_round_trip_gives_identical_outputs_and_a_timing(engine):
    reqs = [greedy(p, 8, f"d{i}") for i, p in enumerate(PROMPTS)]
    before = await asyncio.gather(*(tokens_of(engine, r) for r in reqs))
    await engine.deactivate()
    assert not engine.active and engine.stats().kv_mapped_bytes == 0
    with pytest.raises(EngineInactiveError, match="deactivated"):
        await tokens_of(engine, reqs[0])
    timing = await engine.activate()
    assert isinstance(timing, ActivationTiming)
    assert timing.allocate_s >= 0 and timing.copy_s >= 0 and timing.ready_s >= 0
    assert engine.active and await engine.activate() is None  # active already: nothing to time
    assert await asyncio.gather(*(tokens_of(engine, r) for r in reqs)) == before


# ---- a worker that dies ---------------------------------------------------------------------


async def test_killing_a_worker_mid_stream_fails_its_requests_and_its_engine(
    pool, model_dir, reference, tokenizer, tmp_path
):
    published: list[tuple[str, str]] = []

    async def publish(managed: ManagedEngine) -> None:
        published.append((managed.state, managed.error))

    shared_dir = tmp_path / "shm"
    shared_dir.mkdir()
    (shared_dir / "prism-t-left-by-a-crash.weights").write_bytes(b"x")
    manager = EngineManager(
        [Device(0, "cpu", "cpu", 1 << 30)],
        publish,
        pool,
        shared_weights_dir=shared_dir,
        shared_weights_prefix="prism-t",
    )
    assert list(shared_dir.iterdir()) == []  # an earlier run's copies are removed
    spec = EngineSpec(name="doomed", path=str(model_dir))
    managed = await asyncio.wait_for(manager.load(spec, (0,), activate=True, memory_limit_bytes=0), HANG_GUARD_S)
    try:
        assert managed.state == "active" and isinstance(managed.engine, RemoteEngine)
        # The worker wrote its host weights into a shared file the agent named.
        assert managed.engine.weights_shared and not managed.engine.weights_attached
        assert len(list(shared_dir.glob("prism-t-*.weights"))) == 1
        pid = managed.engine.pid
        max_tokens = 200
        streams = [managed.engine.generate(greedy(p, max_tokens, f"k{i}")) for i, p in enumerate(PROMPTS * 3)]
        for stream in streams:
            await stream.__anext__()
        os.kill(pid, signal.SIGKILL)
        # Each accepted request ends with an explicit error, or complete: a worker that ran ahead of a
        # descheduled test may have streamed all of one's tokens before the kill (seen once in CI).
        lost = 0
        for stream in streams:
            try:
                received = await asyncio.wait_for(tokens_of_stream(stream), HANG_GUARD_S)
            except WorkerLostError as exc:
                assert re.search(rf"engine worker {pid} .*died \(killed by SIGKILL\)", str(exc)), exc
                lost += 1
            else:
                assert len(received) == max_tokens - 1  # all of it (the first token was read above)
        assert lost > 0
        await eventually(lambda: managed.state == "failed", "the engine to be marked failed")
        assert "SIGKILL" in managed.error and published[-1] == ("failed", managed.error)
        with pytest.raises(EngineNotReadyError, match="failed"):
            manager.ready("doomed")
        with pytest.raises(EngineError):
            await tokens_of(managed.engine, greedy("Hello"))
        # Loading it again starts a fresh engine in another worker, which maps the
        # dead worker's shared host weights instead of loading the model.
        again = await asyncio.wait_for(manager.load(spec, (0,), activate=True, memory_limit_bytes=0), HANG_GUARD_S)
        assert again.state == "active" and again.engine.pid != pid
        assert again.engine.weights_attached
        req = greedy("Hello", 4)
        assert await tokens_of(again.engine, req) == reference.greedy(tokenizer.encode(req.prompt), 4)
    finally:
        await manager.stop_all()
    assert list(shared_dir.iterdir()) == []  # unloading removes the copy


async def tokens_of_stream(stream) -> list[int]:
    return [t async for out in stream for t in out.token_ids]


async def test_a_hung_worker_is_killed_and_its_requests_fail(pool, model_dir):
    """SIGSTOP stands in for a hang: the process lives on but answers nothing."""
    worker = await asyncio.wait_for(pool.acquire("cpu"), HANG_GUARD_S)
    engine = await asyncio.wait_for(
        RemoteEngine.load(worker, model_dir, name="hung", unresponsive_after_s=1.0), HANG_GUARD_S
    )
    try:
        stream = engine.generate(greedy("Hello", 250, "hung-1"))
        await stream.__anext__()
        os.kill(engine.pid, signal.SIGSTOP)
        # A request sent to the stopped worker cannot be answered. (The stream in flight could have been
        # produced whole before the stop landed, on a loaded machine: the full suite saw that once.)
        late = engine.generate(greedy("Hello again", 8, "hung-2"))
        with pytest.raises(WorkerLostError, match=rf"engine worker {engine.pid} .*unresponsive, so killed"):
            await asyncio.wait_for(tokens_of_stream(late), HANG_GUARD_S)
        assert engine.lost is not None and not pid_alive(engine.pid)
        try:  # the first ended whole or with the same loss, never hanging
            await asyncio.wait_for(tokens_of_stream(stream), HANG_GUARD_S)
        except WorkerLostError:
            pass
    finally:
        await engine.stop()
