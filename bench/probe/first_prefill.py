"""Probe: what a freshly built engine's first long prefills cost after its
kernel warm-up (the engine's constructor runs it on CUDA), each step logged.
On the H100 (1B): the warm-up's first step took 806 ms (kernel compiles),
then prompts of 1536, 1400 and 1536 tokens took 29, 26 and 13 ms to their
first token.

    python bench/probe/first_prefill.py [--model llama-3.2-1b]"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decode_throughput import build_engine, first_token_s, model_folder, prompt_of_length  # noqa: E402

from services.common.step_costs import CUDA_STEP_TOKENS  # noqa: E402
from services.gpu_agent.engine import engine as engine_module  # noqa: E402

PROMPTS = (1536, 1400, 1536, 3000)


async def main(model: str) -> None:
    engine_module.STEP_LOG = True
    start = time.perf_counter()
    engine = build_engine(model_folder(model), "auto", "cuda", 1, max(PROMPTS), 1)
    print(f"built (with its warm-up) in {time.perf_counter() - start:.2f} s", flush=True)
    engine._batcher.step_tokens = CUDA_STEP_TOKENS  # the serving default (build_engine fits a whole batch)
    try:
        for n in PROMPTS:
            ms = 1e3 * await first_token_s(engine, prompt_of_length(engine, n), f"first-{n}")
            print(f"prompt of {n} tokens: {ms:.1f} ms to the first token", flush=True)
    finally:
        engine.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.2-1b")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", force=True)
    logging.getLogger("kvcached").setLevel(logging.WARNING)
    asyncio.run(main(parser.parse_args().model))
