"""Continuous batching over the paged KV pool: the scheduler on its own (with
a real PagePool), then the engine: batched, chunked and preempted runs give
the same greedy tokens as the reference, the limit can shrink mid-generation
without losing a request, KV accounting returns to zero, cancellation frees
slots, and a deactivate/activate round trip changes nothing."""

from __future__ import annotations

import asyncio
import logging

import pytest
import torch

from prism.tiny_models import write_tiny_model
from services.gpu_agent.engine import Engine, GenerationRequest
from services.gpu_agent.engine import engine as engine_module
from services.gpu_agent.engine.batch_scheduler import BatchScheduler
from services.gpu_agent.engine.kv_pool import KVGeometry, PagePool
from services.gpu_agent.engine.model_runner import WARMUP_NEW_TOKENS, WARMUP_PROMPT_TOKENS
from services.gpu_agent.engine.sampling import SamplingParams
from services.gpu_agent.engine.sequence import Sequence
from tests.engine_watch import gather_watching_running
from tests.reference_llama import ReferenceLlama

GEOMETRY = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32)
SLOT = 128  # bytes of one token in one buffer: a page of SLOT bytes holds one token


# ---- the scheduler ----------------------------------------------------------------


def seq(name: str, prompt_len: int) -> Sequence:
    return Sequence(
        request_id=name,
        prompt_ids=[1] * prompt_len,
        max_tokens=100,
        sampling=SamplingParams(0.0),
        stop=[],
        ignore_eos=True,
        detokenizer=None,
        generator=None,
        deliver=lambda out: True,
    )


def scheduler(limit_tokens: int, step_tokens: int = 64, page_tokens: int = 1) -> BatchScheduler:
    pool = PagePool(GEOMETRY, 256, limit_tokens * GEOMETRY.token_bytes, "cpu", page_bytes=page_tokens * SLOT)
    return BatchScheduler(pool, step_tokens=step_tokens)


def run_step(sched: BatchScheduler) -> list[tuple[str, int, int]]:
    """Schedules, then does what the engine does after the forward."""
    result = sched.schedule()
    for item in result.batch:
        item.seq.num_cached = item.start + item.count
        if item.samples:
            item.seq.token_ids.append(2)
    return [(item.seq.request_id, item.start, item.count) for item in result.batch]


def test_admits_in_order_and_preempts_the_newest():
    sched = scheduler(limit_tokens=12)
    a, b, c = seq("a", 4), seq("b", 4), seq("c", 4)
    for s in (a, b, c):
        sched.add(s)
    # c's 4 slots would leave no headroom for a's and b's next tokens... but they are
    # not decoding yet, so all three are admitted.
    assert run_step(sched) == [("a", 0, 4), ("b", 0, 4), ("c", 0, 4)]
    assert sched.pool.used_tokens == 12
    # Each now needs one more slot: none is free, so the newest (c) goes back,
    # and frees enough for a and b.
    result = sched.schedule()
    assert result.preempted == [c] and [i.seq for i in result.batch] == [a, b]
    assert list(sched.waiting) == [c] and c.num_cached == 0 and c.slots == [] and c.preemptions == 1
    assert sched.pool.used_tokens == 10


def test_decoding_first_then_chunks_under_the_token_budget():
    sched = scheduler(limit_tokens=100, step_tokens=6)
    a, b = seq("a", 3), seq("b", 10)
    sched.add(a)
    sched.add(b)
    assert run_step(sched) == [("a", 0, 3), ("b", 0, 3)]  # a whole, b's first chunk
    assert run_step(sched) == [("a", 3, 1), ("b", 3, 5)]  # a decodes first, b continues
    assert run_step(sched) == [("a", 4, 1), ("b", 8, 2)]  # b's last chunk samples
    assert b.token_ids[-1] == 2 and len(b.token_ids) == 11
    assert run_step(sched) == [("a", 5, 1), ("b", 10, 1)]
    assert sched.pool.used_tokens == len(a.token_ids) + len(b.token_ids) - 2  # the newest tokens are not yet cached


def test_admission_keeps_headroom_for_decoding_sequences():
    sched = scheduler(limit_tokens=10)
    a = seq("a", 5)
    sched.add(a)
    run_step(sched)
    sched.add(seq("b", 4))  # 4 free slots, but a needs one for its next token
    assert run_step(sched) == [("a", 5, 1)]
    assert [s.request_id for s in sched.waiting] == ["b"]


def test_a_lowered_limit_preempts_until_the_pool_fits():
    sched = scheduler(limit_tokens=64, page_tokens=4)
    seqs = [seq(n, 6) for n in "abcd"]
    for s in seqs:
        sched.add(s)
    run_step(sched)  # 4 x 6 slots: 8 pages of 4 (each sequence's slots fill whole pages and halves)
    state = sched.pool.set_memory_limit(10 * GEOMETRY.token_bytes, revision=1)  # two pages
    assert state.status == "deferred"
    result = sched.schedule()
    assert result.preempted[:2] == [seqs[3], seqs[2]]  # newest first
    assert not sched.pool.over_limit
    assert [i.seq for i in result.batch] == sched.running
    assert sched.pool.limit_state().status == "applied"


def test_a_sequence_over_the_limit_waits_and_lets_smaller_ones_pass():
    sched = scheduler(limit_tokens=5)
    big, small = seq("big", 5), seq("small", 2)
    sched.add(big)
    sched.add(small)
    assert run_step(sched) == [("small", 0, 2)]
    assert list(sched.waiting) == [big]
    sched.pool.set_memory_limit(20 * GEOMETRY.token_bytes, revision=1)
    assert run_step(sched) == [("small", 2, 1), ("big", 0, 5)]


def test_admission_that_stops_for_want_of_slots_says_what_the_head_needed_and_the_pool_had():
    # The engine's step log prints it (kv_short): with a kvcached pool the pool can have fewer free
    # slots than the limit leaves room for (it maps only pages the card has free).
    sched = scheduler(limit_tokens=10)
    a, b = seq("a", 6), seq("b", 6)
    sched.add(a)
    sched.add(b)
    result = sched.schedule()
    assert [i.seq for i in result.batch] == [a] and list(sched.waiting) == [b]
    assert result.kv_short == (6, 4)  # b's 6 prompt slots; 10 - 6 are free
    a.num_cached = 6
    a.token_ids.append(2)  # the step ran: a decodes from now on
    # a's next slot taken (3 free), and b would need one more kept for a's token after: 7.
    assert sched.schedule().kv_short == (7, 3)
    sched.remove(a)
    assert sched.schedule().kv_short is None


def test_a_running_sequence_squeezed_below_its_size_waits_for_the_limit():
    sched = scheduler(limit_tokens=20)
    a = seq("a", 8)
    sched.add(a)
    run_step(sched)
    sched.pool.set_memory_limit(4 * GEOMETRY.token_bytes, revision=1)
    result = sched.schedule()
    assert result.preempted == [a] and not result.too_big and list(sched.waiting) == [a]
    assert sched.pool.used_tokens == 0
    sched.pool.set_memory_limit(20 * GEOMETRY.token_bytes, revision=2)
    assert run_step(sched) == [("a", 0, 9)]  # recomputed with its generated token


def test_only_a_sequence_over_the_whole_reservation_is_too_big():
    sched = scheduler(limit_tokens=1000)  # capped at the 256-slot reservation
    huge = seq("huge", 300)
    sched.add(huge)
    result = sched.schedule()
    assert result.too_big == [huge] and not sched.has_work()


def test_removal_frees_everything():
    sched = scheduler(limit_tokens=20)
    a, b = seq("a", 5), seq("b", 5)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    sched.remove(a)
    sched.remove(b)
    assert sched.pool.used_tokens == 0 and sched.pool.mapped_bytes == 0 and not sched.has_work()


# ---- the engine -------------------------------------------------------------------

PROMPTS = [
    "Hello world",
    "The cache of the model is",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "a",
    "café 🙂 naïve 日本語",
    "Once upon a time there was a model that",
    "x y z",
    "tokens " * 12,
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("cb") / "llama", arch="llama")


@pytest.fixture(scope="module")
def reference(model_dir):
    return ReferenceLlama(model_dir)


def greedy(prompt: str, max_tokens: int, request_id: str) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id, prompt=prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True
    )


async def tokens_of(engine: Engine, req: GenerationRequest) -> list[int]:
    return [t async for out in engine.generate(req) for t in out.token_ids]


async def wait_idle(engine: Engine, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        s = engine.stats()
        # Nothing held for requests; what stays mapped is the prefix cache's (given back on demand).
        if (
            s.kv_used_bytes == 0
            and s.kv_held_bytes == 0
            and s.running_requests == 0
            and s.queued_requests == 0
            and (s.kv_mapped_bytes == 0 or s.kv_cached_bytes > 0)
        ):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine not idle: {engine.stats()}")


async def test_batched_chunked_equals_one_at_a_time_and_the_reference(engine_factory, reference, caplog):
    # A small step budget: long prompts are prefilled in several chunks while others decode.
    engine = engine_factory(step_tokens=8, kv_page_bytes=4 * SLOT)
    reqs = [greedy(p, 8 + 3 * i, f"b{i}") for i, p in enumerate(PROMPTS)]
    alone = [await tokens_of(engine, r) for r in reqs]
    together, most_running = await gather_watching_running(engine, [tokens_of(engine, r) for r in reqs])
    assert together == alone
    for req, out in zip(reqs, together):
        assert out == reference.greedy(engine.tokenize_prompt(req), req.max_tokens), req.request_id
    assert most_running > 2
    await wait_idle(engine)


async def test_the_step_log_says_when_admission_waits_for_kv(engine_factory, reference, caplog, monkeypatch):
    # PRISM_ENGINE_STEP_LOG's line for bench/step_log_summary.py: the queue's head, the pool's free slots
    # and the limit's room (here the limit itself holds it back: room and free agree).
    monkeypatch.setattr(engine_module, "STEP_LOG", True)
    engine = engine_factory(step_tokens=64, kv_page_bytes=4 * SLOT)
    reqs = [greedy(p, 12, f"w{i}") for i, p in enumerate(PROMPTS[:3])]
    longest = max(len(engine.tokenize_prompt(r)) for r in reqs) + 12
    engine.set_memory_limit((longest + 8) * engine.kv_bytes_per_token)  # one request at a time, about
    with caplog.at_level(logging.INFO, logger="services.gpu_agent.engine"):
        results = await asyncio.gather(*(tokens_of(engine, r) for r in reqs))
    for req, out in zip(reqs, results):
        assert out == reference.greedy(engine.tokenize_prompt(req), req.max_tokens)
    waits = [r.getMessage() for r in caplog.records if "admission waits for KV" in r.getMessage()]
    assert waits and all("the queue's head needs" in w and "the limit room for" in w for w in waits)
    await wait_idle(engine)


async def test_shrinking_the_limit_mid_generation_preempts_and_completes_all(engine_factory, reference, caplog):
    engine = engine_factory(step_tokens=32, kv_page_bytes=4 * SLOT)
    reqs = [greedy(p, 40, f"s{i}") for i, p in enumerate(PROMPTS)]
    longest = max(len(engine.tokenize_prompt(r)) for r in reqs) + 40
    seen_deferred, over = [], []

    async def squeeze() -> None:
        # Room for the longest request alone and a little more: most must wait.
        limit = (longest + 8) * engine.kv_bytes_per_token
        while engine.stats().kv_mapped_bytes <= limit:
            await asyncio.sleep(0.0005)
        state = engine.set_memory_limit(limit)
        seen_deferred.append(state.status)
        while True:  # from the next step on, mapped memory stays under the limit
            s = engine.stats()
            if s.memory_limit_status == "applied" and s.kv_mapped_bytes > s.memory_limit_bytes:
                over.append(s)
            await asyncio.sleep(0.001)

    squeezer = asyncio.create_task(squeeze())
    with caplog.at_level(logging.INFO, logger="services.gpu_agent.engine"):
        results = await asyncio.gather(*(tokens_of(engine, r) for r in reqs))
    squeezer.cancel()
    assert seen_deferred == ["deferred"] and not over
    assert any("preempted" in r.getMessage() for r in caplog.records)
    for req, out in zip(reqs, results):
        assert out == reference.greedy(engine.tokenize_prompt(req), 40), req.request_id
    await wait_idle(engine)
    # and it grows back
    assert engine.set_memory_limit(1 << 20).status == "applied"
    assert await tokens_of(engine, reqs[0]) == results[0]


async def test_cancel_frees_slots_at_once(engine_factory):
    engine = engine_factory(kv_page_bytes=4 * SLOT)
    streams = [engine.generate(greedy(p, 200, f"c{i}")) for i, p in enumerate(PROMPTS[:4])]
    for stream in streams:
        await stream.__anext__()
    assert engine.stats().kv_used_bytes > 0
    for stream in streams:
        await stream.aclose()
    await wait_idle(engine, timeout=1.0)
    free_after = engine.stats().kv_free_tokens
    assert free_after == engine.stats().memory_limit_bytes // (4 * engine.kv_bytes_per_token) * 4


async def test_deactivate_activate_round_trip_gives_identical_outputs(engine_factory):
    engine = engine_factory()
    reqs = [greedy(p, 12, f"d{i}") for i, p in enumerate(PROMPTS[:3])]
    before = await asyncio.gather(*(tokens_of(engine, r) for r in reqs))
    engine.deactivate()
    assert not engine.active and engine.stats().kv_mapped_bytes == 0
    engine.activate()
    after = await asyncio.gather(*(tokens_of(engine, r) for r in reqs))
    assert after == before
    await wait_idle(engine)


async def test_limit_revisions_through_the_engine(engine_factory):
    engine = engine_factory()
    assert engine.set_memory_limit(1 << 20, revision=5).status == "applied"
    assert engine.set_memory_limit(1 << 21, revision=4).status == "stale"
    s = engine.stats()
    assert s.memory_limit_bytes == 1 << 20 and s.memory_limit_revision == 5
    assert engine.set_memory_limit(1 << 21).revision == 6  # None: the next revision


async def test_the_kernel_warm_up_runs_its_steps_and_leaves_the_engine_as_it_was(model_dir, reference, caplog):
    # On CUDA every engine runs it in its constructor, before the step thread starts; here it is
    # called at the same moment: its requests complete on a pool of its own, and the engine's pool,
    # limit, revision, step budget and outputs are what they were.
    engine = Engine(model_dir, step_tokens=8, kv_page_bytes=4 * SLOT)
    try:
        before = engine.stats()
        with caplog.at_level(logging.INFO):
            finished = engine._warm_up_kernels()
        assert "kernels warm" in caplog.text
        assert "warm-up incomplete" not in caplog.text and "warm-up failed" not in caplog.text
        assert sorted(finished) == sorted(zip(WARMUP_PROMPT_TOKENS, WARMUP_NEW_TOKENS))
        assert engine.stats() == before
        assert engine._batcher.step_tokens == 8
        engine.start()
        req = greedy(PROMPTS[5], 10, "after-warm-up")
        assert await tokens_of(engine, req) == reference.greedy(engine.tokenize_prompt(req), req.max_tokens)
        await wait_idle(engine)
    finally:
        engine.stop()
