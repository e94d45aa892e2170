"""Probe: what a mixed step (decoding sequences and a prefill chunk together,
eager) costs against a pure decode step (a CUDA graph), from the engine's
step log, beside what the simulator's profile prices them at.

    python bench/probe/mixed_steps.py [--model llama-3.2-3b] [--decoders 64] [--profile results/sim-profile-h100.json]
        [--cprofile]

On the H100 (2026-11-27; step-log wall ms, median of the steps of each shape): a pure decode step of 64
sequences (graph) 5.1 ms (3B) and 2.6 ms (1B); a mixed step of 64 decoding sequences and a 64-128-token
prefill chunk 27.4-28.4 ms (3B) and 14.9-15.9 ms (1B), which the H100 profile prices at 14.2-14.7 and
10.5-10.7 ms; a 2048-token prefill alone 26.0 ms (3B) and 12.8 ms (1B), priced at 25.4 and 16.8. So an
eager step with many decoding sequences costs about twice what the profile says, while the GPU work is
small: where the host time goes is what --cprofile is for (not run yet: no device time was left)."""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import pstats
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decode_throughput import build_engine, model_folder, prompt_of_length  # noqa: E402

from prism.simulator.profile import LatencyProfile  # noqa: E402
from services.gpu_agent.engine import GenerationRequest  # noqa: E402
from services.gpu_agent.engine import engine as engine_module  # noqa: E402
from services.gpu_agent.engine.scheduler import CUDA_STEP_TOKENS  # noqa: E402

STEP = re.compile(r"step: (\d+) decode, (\d+) prefill tokens in (\d+) seqs, (graph|eager), ([\d.]+) ms")


class Steps(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, int, int, str, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = STEP.search(record.getMessage())
        if m:
            self.rows.append((int(m[1]), int(m[2]), int(m[3]), m[4], float(m[5])))


async def drive(engine, decoders: int, prompts: list[int]) -> None:
    short = prompt_of_length(engine, 128)

    async def one(tag: str, prompt: str, new: int) -> None:
        req = GenerationRequest(tag, prompt=prompt, max_tokens=new, temperature=0.0, ignore_eos=True)
        async for _ in engine.generate(req):
            pass

    background = [asyncio.create_task(one(f"d{i}", short, 400)) for i in range(decoders)]
    await asyncio.sleep(1.0)
    for i, n in enumerate(prompts):
        await one(f"p{i}", prompt_of_length(engine, n), 2)
        await asyncio.sleep(0.05)
    await asyncio.gather(*background)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="llama-3.2-3b")
    p.add_argument("--decoders", type=int, default=64)
    p.add_argument("--device", default="cuda")
    p.add_argument("--cprofile", action="store_true", help="also cProfile the mixed steps' Python")
    p.add_argument("--profile", default=str(Path(__file__).resolve().parents[1] / "results" / "sim-profile-h100.json"))
    args = p.parse_args()
    steps = Steps()
    logging.getLogger("services.gpu_agent.engine.engine").addHandler(steps)
    logging.getLogger("services.gpu_agent.engine.engine").setLevel(logging.INFO)
    engine = build_engine(model_folder(args.model), "auto", args.device, args.decoders, 128, 400)
    engine._scheduler.step_tokens = CUDA_STEP_TOKENS
    profile = LatencyProfile.load(args.profile)
    try:
        asyncio.run(drive(engine, args.decoders, [128] * 3))  # warm: graphs for the batch sizes
        steps.rows.clear()
        engine_module.STEP_LOG = True
        forward, python_profile = engine._forward, cProfile.Profile()

        def profiled_forward(plan, num_decode):  # only the mixed steps' Python
            mixed = 0 < num_decode < len(plan)
            if mixed:
                python_profile.enable()
            try:
                return forward(plan, num_decode)
            finally:
                if mixed:
                    python_profile.disable()

        engine._forward = profiled_forward if args.cprofile else forward
        asyncio.run(drive(engine, args.decoders, [128, 512, 1024, 2048, 128, 512, 1024, 2048]))
        engine._forward = forward
        engine_module.STEP_LOG = False
        if args.cprofile:
            pstats.Stats(python_profile).sort_stats("tottime").print_stats(25)
        kv = engine.kv_bytes_per_token
        groups: dict[tuple, list[tuple[int, float]]] = {}
        for decode, prefill, seqs, kind, ms in steps.rows:
            groups.setdefault((kind, decode // 16 * 16, prefill), []).append((decode, ms))
        print(f"{'kind':6s} {'decode':>6s} {'prefill':>7s} {'steps':>5s} {'real ms':>8s} {'profile ms':>10s}")
        for (kind, _, prefill), rows in sorted(groups.items()):
            decode = round(statistics.mean(d for d, _ in rows))
            # the decoders' context: 128 prompt tokens and about half their output so far
            priced = 1e3 * profile.step_s(engine.weight_bytes, decode, decode * (128 + 200) * kv, prefill,
                                          1 if prefill else 0)
            real = statistics.median(ms for _, ms in rows)
            print(f"{kind:6s} {decode:6d} {prefill:7d} {len(rows):5d} {real:8.2f} {priced:10.2f}")
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
