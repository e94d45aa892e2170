"""How much two engines on one GPU slow each other: step times of two
engine processes (the agent's process isolation), each alone and then both
at once.

Each process builds its dummy-weight engine (bench/configs), then in three
phases (first alone, second alone, both together, barriers between) runs:
  decode   rounds of --batch concurrent requests (--prompt-tokens prompts,
           --new-tokens new tokens, greedy, EOS ignored); the decode step
           time as bench/decode_throughput.py measures it;
  prefill  --prefills prompts of --prefill-tokens, one after another; the
           mean time to the first token.
The simulator runs colocated engines' steps one at a time (fully serialized,
engines_in_parallel 1) or all at once (2): the `overlap` column says where
the GPU lies between: 0 when a step together takes as long as both engines'
alone steps summed, 1 when it takes as long as alone.

    python bench/colocated_steps.py [--models llama-3.2-1b llama-3.2-3b] [--json out.json]
    python bench/colocated_steps.py --device cpu --models /tmp/tiny-llama /tmp/tiny-qwen2 --batch 2 \
        --prompt-tokens 16 --new-tokens 8 --rounds 2 --prefill-tokens 32 --prefills 2     # smoke test"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import sys
from pathlib import Path

import common  # noqa: F401  first: puts the project on sys.path
from common import environment, table, write_json

PHASES = ("alone", "alone", "together")


def _worker(index: int, args: argparse.Namespace, barrier, results) -> None:
    from decode_throughput import build_engine, decode_round, first_token_s, model_folder, prompt_of_length

    async def measure(engine, decode_prompt: str, prefill_prompt: str, tag: str) -> dict:
        steps = [(await decode_round(engine, decode_prompt, args.prompt_tokens, args.batch, args.new_tokens,
                                     f"{tag}-d{i}"))["step_s"] for i in range(args.rounds)]
        prefills = [await first_token_s(engine, prefill_prompt, f"{tag}-p{i}") for i in range(args.prefills)]
        return {"decode_step_ms": 1e3 * statistics.median(steps), "prefill_ms": 1e3 * statistics.median(prefills)}

    async def run() -> None:
        model = args.models[index]
        engine = build_engine(model_folder(model), "auto", args.device, args.batch, max(args.prompt_tokens,
                                                                                 args.prefill_tokens),
                              args.new_tokens)
        decode_prompt = prompt_of_length(engine, args.prompt_tokens)
        prefill_prompt = prompt_of_length(engine, args.prefill_tokens)
        await measure(engine, decode_prompt, prefill_prompt, "warm")  # graphs, allocator
        for phase, who in enumerate(PHASES):
            barrier.wait()
            if who == "together" or phase == index:
                results[(model, who)] = await measure(engine, decode_prompt, prefill_prompt, f"{who}{phase}")
            barrier.wait()
        engine.stop()

    asyncio.run(run())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs=2, default=["llama-3.2-1b", "llama-3.2-3b"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--prefill-tokens", type=int, default=1536)
    p.add_argument("--prefills", type=int, default=40)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        barrier = ctx.Barrier(2)
        procs = [ctx.Process(target=_worker, args=(i, args, barrier, results)) for i in range(2)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        if any(proc.exitcode for proc in procs):
            sys.exit(f"a worker failed: exit codes {[proc.exitcode for proc in procs]}")
        results = dict(results)
    rows = []
    a, b = args.models
    for model, other in ((a, b), (b, a)):
        for kind in ("decode_step_ms", "prefill_ms"):
            alone, together = results[(model, "alone")][kind], results[(model, "together")][kind]
            other_alone = results[(other, "alone")][kind]
            # together = alone + (1 - overlap) * other's alone step, while both are busy
            overlap = 1 - (together - alone) / other_alone if other_alone else None
            rows.append({"model": model, "step": kind.removesuffix("_ms"), "alone_ms": alone,
                         "together_ms": together, "ratio": together / alone, "overlap": overlap})
    print(table(rows, [("model", "model", "s"), ("step", "step", "s"), ("alone_ms", "alone ms", ".2f"),
                       ("together_ms", "together ms", ".2f"), ("ratio", "x alone", ".2f"),
                       ("overlap", "overlap", ".2f")]))
    write_json(args.json, {"benchmark": "colocated_steps", "environment": environment(), "settings": vars(args) | {
        "json": str(args.json)}, "rows": rows})


if __name__ == "__main__":
    main()
