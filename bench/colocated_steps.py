"""How much engines on one GPU slow each other: step times of two or more
engine processes (the agent's process isolation), each alone and then all
at once.

Each process builds its dummy-weight engine (bench/configs), then in one
phase per engine (that engine alone) and a last one (all together), with
barriers between, runs:
  decode   rounds of --batch concurrent requests (--prompt-tokens prompts,
           --new-tokens new tokens, greedy, EOS ignored); the decode step
           time as bench/decode_throughput.py measures it;
  prefill  --prefills prompts of --prefill-tokens, one after another; the
           mean time to the first token.
The simulator runs colocated engines' steps one at a time (fully serialized,
engines_in_parallel 1) or all at once (2): the `overlap` column says where
the GPU lies between: 0 when a step together takes as long as all engines'
alone steps summed, 1 when it takes as long as alone.

Processes on one GPU time-slice unless CUDA MPS runs: start its daemon
first (`nvidia-cuda-mps-control -d`, CUDA_MPS_PIPE_DIRECTORY set alike for
the daemon and this script) to measure the GPU shared through MPS.

    python bench/colocated_steps.py [--models llama-3.2-1b llama-3.2-3b ...] [--json out.json]
    python bench/colocated_steps.py --device cpu --models /tmp/tiny-llama /tmp/tiny-qwen2 --batch 2 \
        --prompt-tokens 16 --new-tokens 8 --rounds 2 --prefill-tokens 32 --prefills 2     # smoke test"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import subprocess
import sys
from pathlib import Path

import common  # noqa: F401  first: puts the project on sys.path
from common import environment, table, write_json


def _worker(index: int, args: argparse.Namespace, barrier, results) -> None:
    from decode_throughput import build_engine, decode_round, first_token_s, model_folder, prompt_of_length

    async def measure(engine, decode_prompt: str, prefill_prompt: str, tag: str) -> dict:
        steps = [
            (await decode_round(engine, decode_prompt, args.prompt_tokens, args.batch, args.new_tokens, f"{tag}-d{i}"))[
                "step_s"
            ]
            for i in range(args.rounds)
        ]
        prefills = [await first_token_s(engine, prefill_prompt, f"{tag}-p{i}") for i in range(args.prefills)]
        return {"decode_step_ms": 1e3 * statistics.median(steps), "prefill_ms": 1e3 * statistics.median(prefills)}

    async def run() -> None:
        model = args.models[index]
        engine = build_engine(
            model_folder(model),
            "auto",
            args.device,
            args.batch,
            max(args.prompt_tokens, args.prefill_tokens),
            args.new_tokens,
        )
        decode_prompt = prompt_of_length(engine, args.prompt_tokens)
        prefill_prompt = prompt_of_length(engine, args.prefill_tokens)
        await measure(engine, decode_prompt, prefill_prompt, "warm")  # graphs, allocator
        for phase in range(len(args.models) + 1):  # each engine alone, then all together
            who = "together" if phase == len(args.models) else "alone"
            barrier.wait()
            if who == "together" or phase == index:
                results[(index, who)] = await measure(engine, decode_prompt, prefill_prompt, f"{who}{phase}")
            barrier.wait()
        engine.stop()

    asyncio.run(run())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["llama-3.2-1b", "llama-3.2-3b"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--prefill-tokens", type=int, default=1536)
    p.add_argument("--prefills", type=int, default=40)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    if len(args.models) < 2:
        p.error("--models: at least two, to run together")
    count = len(args.models)
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        barrier = ctx.Barrier(count)
        procs = [ctx.Process(target=_worker, args=(i, args, barrier, results)) for i in range(count)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        if any(proc.exitcode for proc in procs):
            sys.exit(f"a worker failed: exit codes {[proc.exitcode for proc in procs]}")
        results = dict(results)
    rows = []
    for index, model in enumerate(args.models):
        for kind in ("decode_step_ms", "prefill_ms"):
            alone, together = results[(index, "alone")][kind], results[(index, "together")][kind]
            others_alone = sum(results[(other, "alone")][kind] for other in range(count) if other != index)
            # together = alone + (1 - overlap) * the others' alone steps, while all are busy
            overlap = 1 - (together - alone) / others_alone if others_alone else None
            rows.append(
                {
                    "model": model,
                    "step": kind.removesuffix("_ms"),
                    "alone_ms": alone,
                    "together_ms": together,
                    "ratio": together / alone,
                    "overlap": overlap,
                }
            )
    print(
        table(
            rows,
            [
                ("model", "model", "s"),
                ("step", "step", "s"),
                ("alone_ms", "alone ms", ".2f"),
                ("together_ms", "together ms", ".2f"),
                ("ratio", "x alone", ".2f"),
                ("overlap", "overlap", ".2f"),
            ],
        )
    )
    write_json(
        args.json,
        {
            "benchmark": "colocated_steps",
            "environment": environment(),
            "settings": vars(args) | {"json": str(args.json), "mps": _mps_daemon_running()},
            "rows": rows,
        },
    )


def _mps_daemon_running() -> bool:
    """Whether a CUDA MPS control daemon runs here (the results differ with it)."""
    try:
        return (
            subprocess.run(["pgrep", "-f", "nvidia-cuda-mps-control"], capture_output=True, check=False).returncode == 0
        )
    except FileNotFoundError:
        return False


if __name__ == "__main__":
    main()
