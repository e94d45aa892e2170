"""End to end through the whole local cluster (gateway -> agent -> engine):
greedy outputs equal the independent reference forward pass of
tests/reference_llama.py, token for token, through the gRPC SDK and the
official openai client, for completions and chat."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from prism_client import PrismClient
from services.gpu_agent.engine.tokenizer import Tokenizer
from tests.reference_llama import ReferenceLlama

MODELS = ("tiny-llama", "tiny-qwen2")
PROMPTS = ("The capital of France is", "1, 2, 3,")
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def references(cluster) -> dict[str, tuple[ReferenceLlama, Tokenizer]]:
    return {name: (ReferenceLlama(path), Tokenizer(path)) for name, path in cluster.models.items() if name in MODELS}


@pytest.fixture()
def sdk(cluster) -> Iterator[PrismClient]:
    with PrismClient(cluster.gateway_grpc, timeout_s=120) as client:
        yield client


@pytest.fixture()
def oai(cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=cluster.http_url + "/v1", api_key="x", max_retries=0, timeout=120)


@pytest.mark.parametrize("model", MODELS)
def test_sdk_greedy_tokens_equal_the_reference(sdk, references, model):
    ref, tok = references[model]
    for prompt in PROMPTS:
        expected = ref.greedy(tok.encode(prompt), NEW_TOKENS)
        done = sdk.generate(model, prompt, max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
        assert done.token_ids == expected, (model, prompt)
        streamed = [
            t
            for c in sdk.generate_stream(model, prompt, max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
            for t in c.token_ids
        ]
        assert streamed == expected, (model, prompt)


@pytest.mark.parametrize("model", MODELS)
def test_openai_greedy_text_equals_the_reference(oai, references, model):
    ref, tok = references[model]
    for prompt in PROMPTS:
        expected = tok.decode(ref.greedy(tok.encode(prompt), NEW_TOKENS))
        done = oai.completions.create(
            model=model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0, extra_body={"ignore_eos": True}
        )
        assert done.choices[0].text == expected, (model, prompt)
        assert done.usage.completion_tokens == NEW_TOKENS


def test_openai_chat_stream_equals_the_reference(oai, references):
    ref, tok = references["tiny-qwen2"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    expected = tok.decode(ref.greedy(tok.encode_chat(messages), NEW_TOKENS))
    chunks = list(
        oai.chat.completions.create(
            model="tiny-qwen2",
            messages=messages,
            max_tokens=NEW_TOKENS,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
