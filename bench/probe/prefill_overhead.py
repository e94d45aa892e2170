"""Probe: where the time to first token of one short prompt goes on the GPU
(an eager prefill step), from the engine's step log, cProfile of the step's
Python (in the engine thread) and torch's profiler, over a few rounds.

    python bench/probe/prefill_overhead.py [--model llama-3.2-1b] [--tokens 128]"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from decode_throughput import build_engine, first_token_s, model_folder, prompt_of_length  # noqa: E402

from services.gpu_agent.engine import engine as engine_module  # noqa: E402


async def rounds(engine, prompt: str, n: int) -> list[float]:
    return [1e3 * await first_token_s(engine, prompt, f"probe-{i}") for i in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="llama-3.2-1b")
    p.add_argument("--tokens", type=int, default=128)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)d %(message)s")
    engine = build_engine(model_folder(args.model), "auto", "cuda", 1, args.tokens, 1)
    try:
        prompt = prompt_of_length(engine, args.tokens)
        print("warm:", [f"{t:.1f}" for t in asyncio.run(rounds(engine, prompt, 3))], flush=True)
        # The step's Python, profiled in the engine thread (cProfile sees only the thread it runs in).
        forward, python_profile = engine._forward, cProfile.Profile()

        def profiled_forward(*a, **kw):
            python_profile.enable()
            try:
                return forward(*a, **kw)
            finally:
                python_profile.disable()

        engine._forward = profiled_forward
        print("cProfiled:", [f"{t:.1f}" for t in asyncio.run(rounds(engine, prompt, 10))], flush=True)
        engine._forward = forward
        pstats.Stats(python_profile).sort_stats("tottime").print_stats(30)
        pstats.Stats(python_profile).sort_stats("cumulative").print_stats(40)
        engine_module.STEP_LOG = True
        print("logged:", [f"{t:.1f}" for t in asyncio.run(rounds(engine, prompt, 3))], flush=True)
        engine_module.STEP_LOG = False
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            times = asyncio.run(rounds(engine, prompt, 5))
        print("profiled:", [f"{t:.1f}" for t in times], flush=True)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
