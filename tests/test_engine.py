"""The built-in PyTorch engine against an independent reference forward pass,
plus its request semantics: sampling, stop strings, EOS, limits, validation,
cancellation, activation."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from prism.tiny_models import write_tiny_model
from services.gpu_agent.engine import (
    CapacityError,
    Engine,
    EngineError,
    EngineInactiveError,
    GenerationOutput,
    GenerationRequest,
    InvalidRequestError,
    ModelConfigError,
    Tokenizer,
)
from services.gpu_agent.engine import engine as engine_module
from services.gpu_agent.engine.detokenizer import IncrementalDetokenizer
from services.gpu_agent.engine.model_config import parse_model_config
from services.gpu_agent.engine.stop_strings import find_stop, held_back_len
from tests.engine_watch import gather_watching_running
from tests.reference_llama import ReferenceLlama

torch.set_num_threads(2)

PROMPTS = ["Hello world", "The cache of the model is", "café 🙂 naïve 日本語", "1 2 3 4 5 6 7 8"]
NEW_TOKENS = 20
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


# ---- fixtures and helpers --------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: write_tiny_model(root / arch, arch=arch) for arch in ("llama", "qwen2")}


def copy_model(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def started(path: Path, **kwargs) -> Engine:
    engine = Engine(path, **kwargs)
    engine.start()
    return engine


@pytest.fixture(scope="module")
def engines(model_dirs):
    made = {arch: started(path) for arch, path in model_dirs.items()}
    yield made
    for engine in made.values():
        engine.stop()


@pytest.fixture(scope="module")
def references(model_dirs) -> dict[str, ReferenceLlama]:
    return {arch: ReferenceLlama(path) for arch, path in model_dirs.items()}


def greedy(prompt: str | None = None, max_tokens: int | None = NEW_TOKENS, **kwargs) -> GenerationRequest:
    kwargs.setdefault("request_id", "r-test")
    return GenerationRequest(prompt=prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kwargs)


async def collect(engine: Engine, req: GenerationRequest) -> list[GenerationOutput]:
    outs = [out async for out in engine.generate(req)]
    assert outs and outs[-1].finish_reason is not None
    assert all(o.finish_reason is None for o in outs[:-1])
    return outs


def token_ids(outs: list[GenerationOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def text(outs: list[GenerationOutput]) -> str:
    return "".join(o.text for o in outs)


async def wait_idle(engine: Engine, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = engine.stats()
        if s.kv_used_bytes == 0 and s.running_requests == 0 and s.queued_requests == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"engine not idle: {engine.stats()}")


# ---- parity with the reference ---------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
async def test_greedy_matches_reference(arch, engines, references):
    engine, ref = engines[arch], references[arch]
    outputs = set()
    for prompt in PROMPTS:
        req = greedy(prompt)
        prompt_ids = engine.tokenize_prompt(req)
        outs = await collect(engine, req)
        assert token_ids(outs) == ref.greedy(prompt_ids, NEW_TOKENS), prompt
        assert outs[-1].finish_reason == "length"
        assert outs[-1].prompt_tokens == len(prompt_ids) and outs[-1].completion_tokens == NEW_TOKENS
        assert text(outs) == engine.tokenizer.decode(token_ids(outs))
        outputs.add(tuple(token_ids(outs)))
    assert len(outputs) == len(PROMPTS)  # the tiny model's output depends on the prompt


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
async def test_concurrent_requests_match_reference(arch, engines, references):
    engine, ref = engines[arch], references[arch]
    reqs = [greedy(p, request_id=f"c{i}", max_tokens=NEW_TOKENS + i) for i, p in enumerate(PROMPTS * 2)]
    results, most_running = await gather_watching_running(engine, [collect(engine, r) for r in reqs])
    for req, outs in zip(reqs, results):
        assert token_ids(outs) == ref.greedy(engine.tokenize_prompt(req), req.max_tokens), req.request_id
    assert most_running > 1
    await wait_idle(engine)


async def test_chat_matches_reference(engines, references):
    engine = engines["qwen2"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    req = greedy(messages=messages)
    ids = engine.tokenize_prompt(req)
    rendered = engine.tokenizer.render_chat(messages)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert ids == engine.tokenizer.encode(rendered, add_special_tokens=False)
    outs = await collect(engine, req)
    assert token_ids(outs) == references["qwen2"].greedy(ids, NEW_TOKENS)
    no_prompt = engine.tokenize_prompt(greedy(messages=messages, add_generation_prompt=False))
    assert len(no_prompt) < len(ids)


async def test_llama_prompt_starts_with_bos(engines):
    engine = engines["llama"]
    ids = engine.tokenize_prompt(greedy("Hi"))
    assert ids[0] == engine.config.bos_token_id
    chat = engine.tokenize_prompt(greedy(messages=[{"role": "user", "content": "Hi"}]))
    assert chat[0] == engine.config.bos_token_id and chat[1] != engine.config.bos_token_id


async def test_llama3_rope_scaling_matches_reference(model_dirs, tmp_path, engines):
    path = copy_model(model_dirs["llama"], tmp_path / "llama3", rope_scaling=LLAMA3_ROPE)
    ref = ReferenceLlama(path)
    engine = started(path)
    try:
        assert engine.config.rope_scaling.rope_type == "llama3"
        differs = False
        for prompt in PROMPTS:
            req = greedy(prompt, max_tokens=40)
            ids = engine.tokenize_prompt(req)
            outs = await collect(engine, req)
            assert token_ids(outs) == ref.greedy(ids, 40), prompt
            plain = await collect(engines["llama"], req)
            differs |= token_ids(plain) != token_ids(outs)
        assert differs  # the scaling changes the model, so parity above means something
    finally:
        engine.stop()


async def test_linear_rope_scaling_matches_reference(model_dirs, tmp_path):
    path = copy_model(model_dirs["qwen2"], tmp_path / "linear", rope_scaling={"type": "linear", "factor": 4.0})
    engine = started(path)
    try:
        req = greedy(PROMPTS[1])
        outs = await collect(engine, req)
        assert token_ids(outs) == ReferenceLlama(path).greedy(engine.tokenize_prompt(req), NEW_TOKENS)
    finally:
        engine.stop()


# ---- sampling ----------------------------------------------------------------


async def test_seeded_sampling_is_reproducible_and_seed_dependent(engines):
    engine = engines["llama"]

    def sampled(seed: int, **kw) -> GenerationRequest:
        return GenerationRequest(
            "s", prompt="Hello", max_tokens=NEW_TOKENS, temperature=1.0, seed=seed, ignore_eos=True, **kw
        )

    first = token_ids(await collect(engine, sampled(7)))
    # The same seed gives the same tokens, also while other requests run.
    again, _ = await asyncio.gather(collect(engine, sampled(7)), collect(engine, sampled(8)))
    assert token_ids(again) == first
    others = {tuple(token_ids(await collect(engine, sampled(s)))) for s in (1, 2, 3)}
    assert tuple(first) not in others and len(others) == 3
    # A tiny nucleus leaves only the most likely token: greedy.
    nucleus = token_ids(await collect(engine, sampled(5, top_p=1e-6)))
    assert nucleus == token_ids(await collect(engine, greedy("Hello")))


# ---- finishing: stop strings, length, EOS -----------------------------------------


async def test_stop_string_cuts_text(engines):
    engine = engines["llama"]
    full = text(await collect(engine, greedy(PROMPTS[1], max_tokens=40)))
    stop = next(
        full[i : i + 3]
        for i in range(4, len(full) - 3)
        if full.find(full[i : i + 3]) == i and "\ufffd" not in full[i : i + 3]
    )
    outs = await collect(engine, greedy(PROMPTS[1], max_tokens=40, stop=["never appears", stop]))
    assert text(outs) == full[: full.index(stop)]
    assert outs[-1].finish_reason == "stop"
    assert outs[-1].completion_tokens < 40
    for o in outs:  # held back while it could still become the stop string
        assert stop not in o.text


async def test_max_tokens_and_context_end_finish_with_length(engines):
    engine = engines["qwen2"]
    outs = await collect(engine, greedy("Hello", max_tokens=3))
    assert [o.finish_reason for o in outs] == [None, None, "length"]
    assert outs[-1].completion_tokens == 3 and len(token_ids(outs)) == 3
    outs = await collect(engine, greedy("Hello", max_tokens=None))
    assert outs[-1].finish_reason == "length"
    assert outs[-1].prompt_tokens + outs[-1].completion_tokens == engine.max_context


async def test_eos_stops_unless_ignored(model_dirs, tmp_path, engines):
    plain = token_ids(await collect(engines["llama"], greedy(PROMPTS[0])))
    at = next(i for i in range(3, NEW_TOKENS) if plain[i] not in plain[:i])
    path = copy_model(model_dirs["llama"], tmp_path / "eos", eos_token_id=[plain[at], 3])
    engine = started(path)
    try:
        assert plain[at] in engine.eos_token_ids
        req = GenerationRequest("e", prompt=PROMPTS[0], max_tokens=NEW_TOKENS, temperature=0.0)
        outs = await collect(engine, req)
        assert outs[-1].finish_reason == "stop"
        assert token_ids(outs) == plain[: at + 1]  # the EOS token is reported ...
        assert text(outs) == engine.tokenizer.decode(plain[:at])  # ... but has no text
        assert outs[-1].completion_tokens == at + 1
        req.ignore_eos = True
        outs = await collect(engine, req)
        assert token_ids(outs) == plain and outs[-1].finish_reason == "length"
    finally:
        engine.stop()


# ---- validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    "req, message",
    [
        (GenerationRequest("v", prompt=""), "prompt is empty"),
        (GenerationRequest("v"), "prompt is empty"),
        (GenerationRequest("v", messages=[]), "messages is empty"),
        (GenerationRequest("v", messages=[{"role": "user"}]), "string role and content"),
        (GenerationRequest("v", prompt="hi", messages=[{"role": "user", "content": "hi"}]), "not both"),
        (GenerationRequest("v", prompt="hi", max_tokens=0), "max_tokens"),
        (GenerationRequest("v", prompt="hi", temperature=-0.5), "temperature"),
        (GenerationRequest("v", prompt="hi", top_p=0.0), "top_p"),
        (GenerationRequest("v", prompt="hi", top_p=1.5), "top_p"),
        (GenerationRequest("v", prompt=" ".join(["word"] * 299)), "over the model's context of 256"),
        (GenerationRequest("v", prompt="hi", max_tokens=255), "over the model's context of 256"),
    ],
)
async def test_invalid_requests_raise_before_streaming(engines, req, message):
    stream = engines["llama"].generate(req)
    with pytest.raises(InvalidRequestError, match=message):
        await stream.__anext__()
    await wait_idle(engines["llama"])


async def test_prompt_that_can_never_fit_raises_capacity_error(model_dirs):
    # One-token pages (the tiny model's slot is 128 bytes a buffer), so a limit of 8 tokens means 8.
    engine = started(model_dirs["llama"], memory_limit_bytes=0, kv_page_bytes=128)
    try:
        engine.set_memory_limit(8 * engine.kv_bytes_per_token)
        assert engine.stats().memory_limit_bytes == 8 * engine.kv_bytes_per_token
        with pytest.raises(CapacityError):
            await collect(engine, greedy("a prompt of quite a few more than eight tokens, surely"))
        outs = await collect(engine, greedy("Hi", max_tokens=2))  # 3 prompt tokens fit
        assert outs[-1].completion_tokens == 2
    finally:
        engine.stop()


# ---- KV limit: queueing and preemption ---------------------------------------------


async def test_requests_queue_and_preempt_under_the_kv_limit(model_dirs, references, caplog):
    engine = started(model_dirs["llama"], kv_page_bytes=4 * 128)  # 4-token pages
    ref = references["llama"]
    try:
        reqs = [greedy(p, request_id=f"q{i}", max_tokens=30) for i, p in enumerate(PROMPTS)]
        longest = max(len(engine.tokenize_prompt(r)) for r in reqs) + 30
        # Room for about 1.5 finished requests: all prompts are admitted at
        # once, then growing sequences preempt the latest ones, which wait.
        engine.set_memory_limit(int(1.5 * longest) * engine.kv_bytes_per_token)
        most_queued, over_limit = 0, []

        async def watch() -> None:
            nonlocal most_queued
            while True:
                s = engine.stats()
                if s.kv_used_bytes > s.memory_limit_bytes:
                    over_limit.append(s)
                most_queued = max(most_queued, s.queued_requests)
                await asyncio.sleep(0.001)

        watcher = asyncio.create_task(watch())
        with caplog.at_level(logging.INFO, logger="services.gpu_agent.engine"):
            results = await asyncio.gather(*(collect(engine, r) for r in reqs))
        watcher.cancel()
        assert most_queued >= 1 and not over_limit
        assert any("preempted" in r.getMessage() for r in caplog.records)
        for req, outs in zip(reqs, results):
            assert token_ids(outs) == ref.greedy(engine.tokenize_prompt(req), 30), req.request_id
        await wait_idle(engine)
    finally:
        engine.stop()


# ---- cancellation ----------------------------------------------------------------


async def test_closing_the_stream_frees_kv(engines):
    engine = engines["llama"]
    stream = engine.generate(greedy("Hello", max_tokens=None))
    await stream.__anext__()
    await stream.__anext__()
    assert engine.stats().kv_used_bytes > 0
    await stream.aclose()
    await wait_idle(engine, timeout=0.5)


async def test_cancelled_consumer_frees_kv(engines):
    engine = engines["qwen2"]
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(greedy("Hello", max_tokens=None)):
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_idle(engine, timeout=0.5)
    # The engine serves on afterwards.
    assert (await collect(engine, greedy("Hi", max_tokens=2)))[-1].finish_reason == "length"


# ---- detokenization ----------------------------------------------------------------


def test_incremental_detokenizer_never_splits_characters(model_dirs):
    tok = Tokenizer(model_dirs["llama"])
    content = "Grüße 🙂🚀 日本語 — done"
    ids = tok.encode(content, add_special_tokens=False)
    assert len(ids) > len(content.split())  # multi-byte characters span several tokens
    prompt = tok.encode("Say:")
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = [detok.push(t) for t in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == content
    assert not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some tokens ended inside a character and were held back


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_streamed_text_concatenates_to_the_full_decode(engines, seed):
    engine = engines["qwen2"]
    # High temperature: a wide spread of tokens, including byte pieces.
    req = GenerationRequest("d", prompt="日本語 🙂", max_tokens=60, temperature=3.0, seed=seed, ignore_eos=True)
    outs = await collect(engine, req)
    assert text(outs) == engine.tokenizer.decode(token_ids(outs))


# ---- loading ----------------------------------------------------------------------


async def test_dummy_model_loads_from_config_alone(model_dirs, tmp_path):
    only_config = tmp_path / "dummy"
    only_config.mkdir()
    shutil.copy(model_dirs["llama"] / "config.json", only_config / "config.json")
    a, b, c = (started(only_config, load_format="dummy", seed=s) for s in (0, 0, 1))
    try:
        assert a.tokenizer.is_byte_fallback
        runs = [token_ids(await collect(e, greedy("Hello dummy"))) for e in (a, b, c)]
        assert runs[0] == runs[1] and runs[0] != runs[2]
        assert all(len(r) == NEW_TOKENS for r in runs)
        chat = await collect(a, greedy(messages=[{"role": "user", "content": "Hi"}]))  # the fallback template
        assert chat[-1].completion_tokens == NEW_TOKENS
    finally:
        for e in (a, b, c):
            e.stop()


async def test_sharded_checkpoint_loads(model_dirs, tmp_path, engines):
    path = tmp_path / "sharded"
    shutil.copytree(model_dirs["llama"], path)
    tensors = load_file(str(path / "model.safetensors"))
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(path / file))
        weight_map.update({n: file for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    engine = started(path, load_format="safetensors")
    try:
        req = greedy(PROMPTS[2])
        assert token_ids(await collect(engine, req)) == token_ids(await collect(engines["llama"], req))
    finally:
        engine.stop()


def test_missing_tensor_and_bad_format_fail_to_load(model_dirs, tmp_path):
    path = tmp_path / "broken"
    shutil.copytree(model_dirs["llama"], path)
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.norm.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(EngineError, match="model.norm.weight"):
        Engine(path)
    with pytest.raises(EngineError, match="load_format"):
        Engine(model_dirs["llama"], load_format="pickle")


def test_engine_attributes(engines):
    llama, qwen2 = engines["llama"], engines["qwen2"]
    assert llama.name == "llama" and llama.device == "cpu" and llama.max_context == 256
    cfg = llama.config
    assert llama.kv_bytes_per_token == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    # Tied embeddings are counted once.
    assert qwen2.weight_bytes < llama.weight_bytes
    assert qwen2.config.tie_word_embeddings and qwen2.config.qkv_bias and not qwen2.config.o_bias
    assert set(qwen2.config.eos_token_ids) <= qwen2.eos_token_ids and len(qwen2.config.eos_token_ids) == 2


# ---- life cycle ---------------------------------------------------------------------


async def test_deactivate_refuses_and_activate_serves_again(model_dirs):
    engine = started(model_dirs["qwen2"], name="tiny")
    try:
        running = engine.generate(greedy("Hello", max_tokens=None))
        await running.__anext__()
        await asyncio.to_thread(engine.deactivate)
        engine.deactivate()  # idempotent
        assert not engine.active
        with pytest.raises(EngineInactiveError):  # the running request ends, it does not hang
            async for _ in running:
                pass
        with pytest.raises(EngineInactiveError):
            await engine.generate(greedy("Hello")).__anext__()
        await wait_idle(engine)
        engine.activate()
        engine.activate()
        assert engine.active
        assert (await collect(engine, greedy("Hello")))[-1].completion_tokens == NEW_TOKENS
    finally:
        engine.stop()


async def test_no_room_for_the_weights_is_a_capacity_error_and_the_engine_comes_back_later(model_dirs, monkeypatch):
    """The device out of memory when the weights come back (the agent's count of it was short) refuses
    the activation with CapacityError (RESOURCE_EXHAUSTED at the agent): the engine stays off and whole."""
    engine = started(model_dirs["llama"], name="tiny")
    try:
        engine.deactivate()
        move = engine._runner.move_weights

        def out_of_memory(device):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 14.96 GiB.")

        monkeypatch.setattr(engine._runner, "move_weights", out_of_memory)
        with pytest.raises(CapacityError, match="no room on cpu for its weights"):
            engine.activate()
        assert not engine.active
        monkeypatch.setattr(engine._runner, "move_weights", move)
        engine.activate()
        assert (await collect(engine, greedy("Hello")))[-1].completion_tokens == NEW_TOKENS
    finally:
        engine.stop()


def failing_forward(engine: Engine, failures: int | None):
    """The runner's forward, running the device out of memory on its first `failures` calls (None: on
    every call) as a step's activations do beside a full device."""
    forward = engine._runner.forward
    calls = {"n": 0}

    def forward_or_out_of_memory(*args, **kwargs):
        calls["n"] += 1
        if failures is None or calls["n"] <= failures:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 28.00 MiB.")
        return forward(*args, **kwargs)

    return forward_or_out_of_memory, calls


async def test_a_step_that_runs_the_device_out_of_memory_is_tried_again(model_dirs, monkeypatch, caplog):
    """A step's activations finding no room (live: 19 requests failed INTERNAL on a full H100) is not the
    requests' failure: the step is run again after a wait, and the output is what it would have been."""
    engine = started(model_dirs["llama"], name="tiny")
    try:
        expected = token_ids(await collect(engine, greedy("Hello", request_id="before")))
        forward, calls = failing_forward(engine, failures=3)
        monkeypatch.setattr(engine._runner, "forward", forward)
        with caplog.at_level(logging.WARNING):
            outs = await collect(engine, greedy("Hello", request_id="after"))
        assert token_ids(outs) == expected and outs[-1].finish_reason == "length"
        assert calls["n"] > 3 and caplog.text.count("out of device memory in a step") == 3
    finally:
        engine.stop()


async def test_a_device_out_of_memory_for_long_fails_the_step_with_capacity_error(model_dirs, monkeypatch):
    """Out of memory for OOM_GIVE_UP_S: the step's requests end with CapacityError (RESOURCE_EXHAUSTED at
    the agent), not an internal error, and the engine serves again once memory is back."""
    monkeypatch.setattr(engine_module, "OOM_GIVE_UP_S", 0.3)
    engine = started(model_dirs["llama"], name="tiny")
    try:
        forward = engine._runner.forward
        failing, calls = failing_forward(engine, failures=None)
        monkeypatch.setattr(engine._runner, "forward", failing)
        started_at = time.monotonic()
        with pytest.raises(CapacityError, match="out of memory for 0.3s"):
            await collect(engine, greedy("Hello"))
        assert time.monotonic() - started_at >= 0.3 and calls["n"] >= 3
        monkeypatch.setattr(engine._runner, "forward", forward)
        assert (await collect(engine, greedy("Hello")))[-1].completion_tokens == NEW_TOKENS
    finally:
        engine.stop()


async def test_stop_ends_running_requests(model_dirs):
    engine = started(model_dirs["llama"])
    running = engine.generate(greedy("Hello", max_tokens=None))
    await running.__anext__()
    await asyncio.to_thread(engine.stop)
    with pytest.raises(EngineError, match="engine stopped"):
        async for _ in running:
            pass
    with pytest.raises(EngineError, match="engine stopped"):
        await engine.generate(greedy("Hello")).__anext__()
    engine.stop()  # idempotent


async def test_logs_carry_the_request_id(engines, caplog):
    with caplog.at_level(logging.INFO, logger="services.gpu_agent.engine"):
        await collect(engines["llama"], greedy("Hi", max_tokens=2, request_id="req-42"))
    mine = [r for r in caplog.records if getattr(r, "request_id", None) == "req-42"]
    assert any("finished" in r.getMessage() for r in mine)


# ---- pieces ---------------------------------------------------------------------------


def test_stop_string_helpers():
    assert find_stop("abc STOP def END", ["END", "STOP"]) == 4
    assert find_stop("abc", ["x"]) == -1
    assert held_back_len("hello ST", ["STOP"]) == 2
    assert held_back_len("hello", ["STOP"]) == 0
    assert held_back_len("xab", ["abc", "b"]) == 2


def test_model_config_parsing():
    base = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 100,
    }
    cfg = parse_model_config(base)
    assert cfg.head_dim == 16 and cfg.num_key_value_heads == 4 and cfg.eos_token_ids == () and cfg.rope_scaling is None
    cfg = parse_model_config({**base, "eos_token_id": 5, "attention_bias": True, "rope_scaling": LLAMA3_ROPE})
    assert cfg.eos_token_ids == (5,) and cfg.qkv_bias and cfg.o_bias and cfg.rope_scaling.factor == 8.0
    cfg = parse_model_config({**base, "architectures": ["Qwen2ForCausalLM"], "eos_token_id": [1, 2], "head_dim": 32})
    assert (
        cfg.model_type == "qwen2"
        and cfg.eos_token_ids == (1, 2)
        and cfg.qkv_bias
        and not cfg.o_bias
        and cfg.head_dim == 32
    )
    cfg = parse_model_config({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}})
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling is None
    for bad in (
        {**base, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"},
        {**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
        {**base, "hidden_act": "gelu"},
        {k: v for k, v in base.items() if k != "vocab_size"},
    ):
        with pytest.raises(ModelConfigError):
            parse_model_config(bad)


def test_fallback_chat_template(model_dirs, tmp_path):
    path = tmp_path / "no-template"
    shutil.copytree(model_dirs["qwen2"], path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = Tokenizer(path)
    assert tok.chat_template.is_fallback
    assert tok.render_chat([{"role": "user", "content": "Hi"}]) == "user: Hi\n\nassistant: "


# ---- CUDA (skipped on machines without a GPU) -------------------------------------------

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@requires_cuda
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
async def test_cuda_greedy_matches_reference(arch, model_dirs, references):
    engine = started(model_dirs[arch], device="cuda", dtype="float32")
    try:
        assert engine.device == "cuda:0"
        reqs = [greedy(p, request_id=f"g{i}") for i, p in enumerate(PROMPTS)]
        results = await asyncio.gather(*(collect(engine, r) for r in reqs))
        for req, outs in zip(reqs, results):
            assert token_ids(outs) == references[arch].greedy(engine.tokenize_prompt(req), NEW_TOKENS)
    finally:
        engine.stop()


@requires_cuda
async def test_cuda_auto_dtype_is_the_checkpoints(model_dirs, tmp_path):
    path = copy_model(model_dirs["llama"], tmp_path / "bf16", torch_dtype="bfloat16")
    engine = started(path, device="cuda")
    try:
        assert engine.dtype == torch.bfloat16
        cfg = engine.config
        assert engine.kv_bytes_per_token == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
        outs = await collect(engine, greedy("Hello"))
        assert outs[-1].completion_tokens == NEW_TOKENS
        req = GenerationRequest("s", prompt="Hello", max_tokens=NEW_TOKENS, temperature=1.0, seed=3, ignore_eos=True)
        assert token_ids(await collect(engine, req)) == token_ids(await collect(engine, req))
    finally:
        engine.stop()


@requires_cuda
async def test_cuda_deactivate_moves_weights_off_the_gpu(model_dirs):
    engine = started(model_dirs["qwen2"], device="cuda", dtype="float32")
    try:
        before = token_ids(await collect(engine, greedy("Hello")))
        on_gpu = torch.cuda.memory_allocated()
        await asyncio.to_thread(engine.deactivate)
        assert torch.cuda.memory_allocated() <= on_gpu - engine.weight_bytes
        assert all(p.device.type == "cpu" and p.is_pinned() for p in engine._runner.model.parameters())
        await asyncio.to_thread(engine.activate)
        assert all(p.device.type == "cuda" for p in engine._runner.model.parameters())
        assert token_ids(await collect(engine, greedy("Hello"))) == before
    finally:
        engine.stop()


def test_importing_the_engine_imports_no_triton():
    """The engine module must import without triton and without touching
    TRITON_INTERPRET: the kernel module is imported only when used. Nor
    torch's compile stack, which imports triton where it is installed (a CPU
    host has no triton, so this is what the check can see there). Here, not
    in test_triton_decode.py, which is skipped where triton is missing."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import os, sys; import services.gpu_agent.engine; "
        "import services.gpu_agent.engine.paged_attention; "
        "assert 'triton' not in sys.modules, 'triton imported'; "
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported'; "
        "assert 'TRITON_INTERPRET' not in os.environ"
    )
    subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, env=env, check=True, timeout=120
    )
