"""What one prefill step costs, per prompt and per token: the time to first
token of single prompts of several lengths and of batches of short prompts,
on the built-in engine alone (dummy weights, bench/configs).

Each shape is sent as `batch` concurrent greedy requests of exactly
`prompt_tokens` prompt tokens and 2 new tokens; the engine's step budget
holds the whole shape, so every prompt is prefilled in one step, and the time
is the client's, from submission to the last request's first token. One
untimed round of each shape goes first (kernel choice, allocator), then
--repeats timed ones; the table has their median and the fit

    first token = intercept + per_prompt * batch + per_token * batch * prompt_tokens

that the simulator's profile takes (prism.simulator.profile.fit_prefill;
bench/fit_profile.py --prefill). bench/decode_throughput.py's prefill column
is one step of 1 and of 32 prompts of 128 tokens, which cannot tell a
prompt's own cost from its tokens'.

    python bench/prefill_steps.py [--models llama-3.2-1b,llama-3.2-3b,llama-3.1-8b]
        [--json bench/results/prefill_steps-h100.json]
    python bench/prefill_steps.py --device cpu --models /tmp/tiny-llama --singles 16,64 --batches 4 \\
        --batch-prompt-tokens 16 --repeats 2 --attention torch      # smoke test"""

from __future__ import annotations

import argparse
import asyncio
import statistics

import common  # noqa: F401  first: puts the project on sys.path
from common import environment, table, write_json
from decode_throughput import (
    build_engine,
    decode_round,
    free_device_memory,
    int_list,
    model_folder,
    name_list,
    prompt_of_length,
)

from prism.simulator.profile import fit_prefill


async def first_token_rounds(engine, prompt: str, tokens: int, batch: int, repeats: int, tag: str) -> list[float]:
    """Seconds to the last first token of `batch` concurrent prompts, `repeats` times, after one untimed round."""
    await decode_round(engine, prompt, tokens, batch, 2, tag + "-warmup")
    return [(await decode_round(engine, prompt, tokens, batch, 2, f"{tag}-{i}"))["prefill_s"] for i in range(repeats)]


def measure(model: str, args: argparse.Namespace) -> list[dict]:
    import torch

    shapes = [(1, n) for n in args.singles] + [(b, args.batch_prompt_tokens) for b in args.batches]
    longest = max(b * n for b, n in shapes)
    # build_engine's budget is max_batch * prompt_tokens: one step holds every shape's prompts.
    engine = build_engine(model_folder(model), args.attention, args.device, 1, longest, 2)
    rows = []
    try:
        for batch, tokens in shapes:
            prompt = prompt_of_length(engine, tokens)
            tag = f"{model}-b{batch}-p{tokens}"
            samples = asyncio.run(first_token_rounds(engine, prompt, tokens, batch, args.repeats, tag))
            rows.append(
                {
                    "model": model,
                    "batch": batch,
                    "prompt_tokens": tokens,
                    "first_token_ms": 1e3 * statistics.median(samples),
                    "samples_ms": [round(1e3 * s, 3) for s in samples],
                }
            )
            print(f"  {tag}: {rows[-1]['first_token_ms']:.2f} ms", flush=True)
    finally:
        engine.stop()
        del engine
        free_device_memory(torch.device(args.device))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=name_list, default=["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"])
    p.add_argument("--singles", type=int_list, default=[128, 512, 1024, 2048], help="single prompts' lengths")
    p.add_argument("--batches", type=int_list, default=[4, 16], help="batches of --batch-prompt-tokens prompts")
    p.add_argument("--batch-prompt-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--attention", default="triton")
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    results, fits = [], []
    for model in args.models:
        rows = measure(model, args)
        results += rows
        intercept, per_prompt, per_token = fit_prefill(rows)
        fits.append(
            {
                "model": model,
                "intercept_ms": intercept * 1e3,
                "per_prompt_ms": per_prompt * 1e3,
                "per_1k_tokens_ms": per_token * 1e6,
            }
        )
    print(
        table(
            results,
            [
                ("model", "model", ""),
                ("batch", "batch", "d"),
                ("prompt_tokens", "prompt", "d"),
                ("first_token_ms", "first token ms", ".2f"),
            ],
        )
    )
    print()
    print(
        table(
            fits,
            [
                ("model", "model", ""),
                ("intercept_ms", "intercept ms", ".2f"),
                ("per_prompt_ms", "per prompt ms", ".3f"),
                ("per_1k_tokens_ms", "per 1k tokens ms", ".2f"),
            ],
        )
    )
    write_json(
        args.json,
        {
            "environment": environment(),
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "results": results,
            "fits": fits,
        },
    )


if __name__ == "__main__":
    main()
