"""Automatic prefix caching (services/gpu_agent/engine/prefix_cache.py): the
cache on its own (chains, reference counts, the order blocks are given back
in), then the engine on a tiny model: randomized shared-prefix workloads give
the same tokens with the cache on and off (chunked prefill, preemption under a
small limit, stop strings, seeded sampling), the cache is given back first when
the limit shrinks and is not counted as used, and a switch off drops it."""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from prism.tiny_models import write_tiny_model
from services.gpu_agent.engine import Engine, GenerationRequest
from services.gpu_agent.engine.prefix_cache import PrefixCache

# ---- the cache on its own ---------------------------------------------------------------


def test_a_released_sequence_leaves_its_full_blocks_and_a_later_one_matches_them():
    cache = PrefixCache(block_tokens=4)
    tokens = list(range(10))  # two full blocks and two tokens
    freed = cache.release([], tokens, slots=list(range(100, 110)), num_computed=10)
    assert freed == [108, 109]  # the partial block is not kept
    assert cache.stats().reclaimable_tokens == 8
    chain = cache.match(tokens + [99])
    assert [b.slots for b in chain] == [[100, 101, 102, 103], [104, 105, 106, 107]]
    assert cache.stats().reclaimable_tokens == 0  # held now
    # At least the last token is left to compute: a prompt of exactly two blocks matches one.
    cache.unmatch(chain)
    assert len(cache.match(tokens[:8])) == 1


def test_another_prefix_diverges_at_its_first_different_block():
    cache = PrefixCache(block_tokens=2)
    cache.release([], [1, 2, 3, 4, 5, 6], list(range(6)), num_computed=6)
    assert len(cache.match([1, 2, 3, 4, 9, 9, 9])) == 2
    assert len(cache.match([1, 2, 9, 4, 5, 6, 7])) == 1
    assert cache.match([2, 1, 3, 4, 5, 6, 7]) == []  # the same later blocks after another first one


def test_only_computed_tokens_are_cached():
    cache = PrefixCache(block_tokens=2)
    # A sequence preempted with 3 of its 6 slots computed: one block is kept, its other slots are freed.
    assert cache.release([], [1, 2, 3, 4, 5, 6], [10, 11, 12, 13, 14, 15], num_computed=3) == [12, 13, 14, 15]
    assert cache.stats().cached_tokens == 2


def test_a_block_cached_twice_keeps_the_first_and_frees_the_second():
    cache = PrefixCache(block_tokens=2)
    assert cache.release([], [1, 2, 3], [10, 11, 12], num_computed=3) == [12]
    assert cache.release([], [1, 2, 4], [20, 21, 22], num_computed=3) == [20, 21, 22]
    assert [b.slots for b in cache.match([1, 2, 9])] == [[10, 11]]


def test_children_are_given_back_before_their_parents_and_held_blocks_never():
    cache = PrefixCache(block_tokens=1)
    cache.release([], [1, 2, 3], [10, 11, 12], num_computed=3)  # chain 1 -> 2 -> 3
    cache.release([], [7, 8], [20, 21], num_computed=2)  # a later chain 7 -> 8
    held = cache.match([7, 8, 9])
    assert cache.evict(1) == [12]  # the oldest chain's deepest block
    assert cache.evict(5) == [11, 10]  # then its parents; 7 and 8 are held
    assert cache.evict(1) == []
    cache.release(held, [7, 8, 9], [20, 21, 30], num_computed=3)
    assert cache.evict(10) == [30, 21, 20]
    assert cache.stats().cached_tokens == 0


def test_clear_refuses_while_a_sequence_holds_blocks():
    cache = PrefixCache(block_tokens=1)
    cache.release([], [1, 2], [10, 11], num_computed=2)
    held = cache.match([1, 2, 3])
    with pytest.raises(RuntimeError, match="still held"):
        cache.clear()
    cache.unmatch(held)
    assert sorted(cache.clear()) == [10, 11]


def test_counts_the_pages_that_only_the_cache_keeps():
    cache = PrefixCache(block_tokens=2, tokens_per_page=4)
    cache.release([], [1, 2, 3, 4, 5], [0, 1, 2, 3, 9], num_computed=5)
    assert dict(cache.reclaimable_in_page) == {0: 4}
    held = cache.match([1, 2, 3])
    assert dict(cache.reclaimable_in_page) == {0: 2}
    cache.unmatch(held)
    cache.evict(4)
    assert dict(cache.reclaimable_in_page) == {}


# ---- the engine ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("prefix-cache") / "llama")


WORDS = "the a cache of tokens model is prefix shared system prompt you are helpful answer briefly".split()


def shared_prefix_workload(seed: int, n: int = 24) -> list[GenerationRequest]:
    """n requests over three long shared prefixes (a system prompt each) with their own endings, a few
    conversations that repeat an earlier request's text and add a turn; greedy mostly, some seeded
    samples, some with a stop string."""
    rng = random.Random(seed)
    # The tiny model's context is 256 tokens, about a character each.
    prefixes = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 20))) for _ in range(3)]
    requests: list[GenerationRequest] = []
    for i in range(n):
        earlier = [r.prompt for r in requests if len(r.prompt) < 160]
        if earlier and rng.random() < 0.25:  # the next turn of an earlier conversation
            prompt = rng.choice(earlier) + " and then " + rng.choice(WORDS)
        else:
            prompt = rng.choice(prefixes) + " " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
        sampled = rng.random() < 0.25
        requests.append(
            GenerationRequest(
                request_id=f"r{i}",
                prompt=prompt,
                max_tokens=rng.randint(4, 24),
                ignore_eos=True,
                temperature=0.8 if sampled else 0.0,
                seed=rng.randrange(1 << 30) if sampled else None,
                stop=[rng.choice(WORDS)] if rng.random() < 0.2 else [],
            )
        )
    return requests


async def run_in_waves(engine: Engine, requests: list[GenerationRequest], wave: int = 6) -> dict[str, tuple]:
    """Each request's (tokens, text, cached prompt tokens), `wave` at a time."""

    async def one(req: GenerationRequest) -> tuple[str, tuple]:
        outs = [out async for out in engine.generate(req)]
        return req.request_id, (
            tuple(t for o in outs for t in o.token_ids),
            "".join(o.text for o in outs),
            outs[-1].cached_tokens,
        )

    results: dict[str, tuple] = {}
    for start in range(0, len(requests), wave):
        results.update(await asyncio.gather(*(one(r) for r in requests[start : start + wave])))
    return results


@pytest.mark.parametrize("seed", [0, 1, 2])
async def test_outputs_are_the_same_with_the_cache_on_and_off(engine_factory, seed, caplog):
    # A small step budget (prompts are prefilled in chunks beside decoding sequences) and a limit of
    # 320 tokens (the tiny model's KV is 512 bytes a token), little more than one full context: sequences
    # are preempted and computed again, and cached blocks are given back for running ones.
    settings = dict(dtype="float32", step_tokens=16, kv_page_bytes=4096, memory_limit_bytes=320 * 512)
    requests = shared_prefix_workload(seed)
    with caplog.at_level(logging.INFO, logger="services.gpu_agent.engine"):
        off = await run_in_waves(engine_factory(prefix_caching=False, **settings), requests)
        cached = engine_factory(prefix_caching=True, **settings)
        on = await run_in_waves(cached, requests)
    assert any("preempted" in r.getMessage() for r in caplog.records)
    for req in requests:
        assert on[req.request_id][:2] == off[req.request_id][:2], req
        assert off[req.request_id][2] == 0
    stats = cached.stats()
    assert stats.prefix_cache_hit_tokens > 0.3 * stats.prefix_cache_queried_tokens, stats
    # Reported as OpenAI does: the prompt tokens that came from the cache, never more than the prompt.
    assert sum(result[2] for result in on.values()) > 0
    assert all(0 <= result[2] for result in on.values())


async def test_the_cache_is_not_used_memory_and_goes_first_when_the_limit_shrinks(engine_factory):
    engine = engine_factory(dtype="float32", kv_page_bytes=4096)
    requests = shared_prefix_workload(3, n=8)
    await run_in_waves(engine, requests)
    stats = engine.stats()
    assert stats.running_requests == stats.queued_requests == 0
    assert stats.kv_cached_bytes > 0 and stats.kv_used_bytes == 0 and stats.kv_held_bytes == 0
    assert stats.kv_mapped_bytes > 0  # the cache keeps its pages mapped...
    state = engine.set_memory_limit(0)
    # ... and gives them back at once, without waiting for a step.
    assert state.status == "applied" and state.mapped_bytes == 0, state
    assert engine.stats().kv_cached_bytes == 0
    engine.set_memory_limit(4 * 1024 * 1024)
    again = await run_in_waves(engine, requests[:2])
    assert all(cached == 0 for _, _, cached in again.values())  # nothing was left to hit


async def test_a_switch_off_drops_the_cache_and_a_switch_on_serves_the_same(engine_factory):
    engine = engine_factory(dtype="float32", kv_page_bytes=4096)
    requests = shared_prefix_workload(4, n=6)
    first = await run_in_waves(engine, requests)
    assert engine.stats().kv_cached_bytes > 0
    engine.deactivate()
    assert engine.stats().kv_cached_bytes == 0 and engine.stats().kv_mapped_bytes == 0
    engine.activate()
    second = await run_in_waves(engine, requests)
    for req in requests:
        assert second[req.request_id][:2] == first[req.request_id][:2]


# ---- under ballooning: what only the cache keeps is the first memory another model gets ----------------------------


async def test_a_neighbours_burst_takes_the_memory_only_the_cache_keeps(model_dir):
    """Two models on one device of an in-process agent (its memory coordinator balloons KV between them).
    `cached` serves distinct prompts until its cache holds most of the device's KV budget, then idles;
    `bursting` then gets a burst whose KV needs that memory. The coordinator counts the cache as neither
    used nor held, so it lowers `cached`'s limit at once and the engine gives the cache back: the burst
    completes, served in memory the cache had."""
    import grpc
    from in_process_agent import InProcessAgent

    from prism_client.v1 import generate_pb2

    def stream(agent, model: str, prompt: str, max_tokens: int):
        return agent.stub.Generate(
            generate_pb2.GenerateRequest(
                request_id=f"{model}-{prompt[:12]}-{random.random()}",
                model=model,
                prompt=prompt,
                sampling=generate_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
            ),
            timeout=120,
        )

    async def finish(call) -> int:
        last = None
        while (response := await call.read()) is not grpc.aio.EOF:
            last = response
        assert last is not None and last.finish_reason == generate_pb2.FINISH_REASON_LENGTH
        return last.usage.completion_tokens

    rng = random.Random(5)
    # 6 MiB: ~1.2 MB of weights for both, the rest KV (the tiny model's token is 512 bytes: ~10k tokens).
    async with InProcessAgent(cpu_memory_gb=6 / 1024) as agent:
        for name in ("cached", "bursting"):
            await agent.load(name, str(model_dir))
        engines = {name: agent.manager.engines[name].engine for name in ("cached", "bursting")}
        for wave in range(6):  # distinct prompts: their blocks stay cached
            calls = [stream(agent, "cached", " ".join(rng.choice(WORDS) for _ in range(30)), 40) for _ in range(8)]
            await asyncio.gather(*(finish(c) for c in calls))
        cached_before = engines["cached"].stats().kv_cached_bytes
        budget = agent.coordinator.snapshot().budget_bytes
        assert cached_before > budget // 3, (cached_before, budget)
        assert engines["cached"].stats().kv_used_bytes == 0
        burst = [stream(agent, "bursting", f"burst request {i} " + "x y " * 20, 120) for i in range(40)]
        assert await asyncio.gather(*(finish(c) for c in burst)) == [120] * 40
        # Served in what the cache gave back: the burst's KV at its peak was beyond what was free beside it.
        cached_after = engines["cached"].stats().kv_cached_bytes
        assert cached_after < cached_before, (cached_before, cached_after)
        assert (
            engines["cached"].stats().kv_mapped_bytes <= agent.manager.engines["cached"].memory_limit_bytes
            or engines["cached"].stats().memory_limit_status == "applied"
        )
