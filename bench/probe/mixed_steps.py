"""Probe: what a mixed step (decoding sequences and a prefill chunk together,
eager) costs against a pure decode step (a CUDA graph), from the engine's
step log, beside what the simulator's profile prices them at.

    python bench/probe/mixed_steps.py [--model llama-3.2-3b] [--decoders 64] [--profile results/sim-profile-h100.json]
        [--cprofile] [--repeat 5 [--torch-profile]] [--switch-interval 0.0002]

On the H100 (2026-11-27; step-log wall ms, median of the steps of each shape): a pure decode step of 64
sequences (graph) 5.1 ms (3B) and 2.6 ms (1B); a mixed step of 64 decoding sequences and a 64-128-token
prefill chunk 27.4-28.4 ms (3B) and 14.9-15.9 ms (1B), which the H100 profile prices at 14.2-14.7 and
10.5-10.7 ms; a 2048-token prefill alone 26.0 ms (3B) and 12.8 ms (1B), priced at 25.4 and 16.8.

Where the time goes (3B, later the same day): --repeat 5 runs the same mixed step (64 decoding, 128
prefill tokens) again and again: 12.2-13.8 ms at best, 18-28 ms at the median, and no quieter with
kvcached's page prealloc thread off (KVCACHED_PAGE_PREALLOC_ENABLED=false) or a 0.2 ms --switch-interval.
--torch-profile of one: 4.6 ms of kernels against ~12 ms of host time (profiled), so an eager step of
this size is bound by its host side, ~0.4 ms a layer of launches (linear, index, flash attention, cat,
empty, Triton's launcher), and its spread is the host's. cProfile (--cprofile) agrees: no single Python
function stands out; torch ops that let go of the GIL take 50-110 us each while the event loop has work.
The profile's price is within the best case; the median is ~1.5-2x it."""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import pstats
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from decode_throughput import build_engine, model_folder, prompt_of_length  # noqa: E402

from prism.simulator.profile import LatencyProfile  # noqa: E402
from services.common.step_costs import CUDA_STEP_TOKENS  # noqa: E402
from services.gpu_agent.engine import GenerationRequest  # noqa: E402
from services.gpu_agent.engine import engine as engine_module  # noqa: E402

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
    p.add_argument(
        "--repeat",
        type=int,
        default=0,
        help="run each mixed step's forward this many times more (the same tokens into the same slots, "
        "so the same result): its time with the event loop idle and every shape seen before",
    )
    p.add_argument(
        "--torch-profile",
        action="store_true",
        help="torch.profiler over one repeat of a mixed step of 64 decoding sequences and a 128-token "
        "prefill: host time and kernel time by op",
    )
    p.add_argument("--profile", default=str(Path(__file__).resolve().parents[1] / "results" / "sim-profile-h100.json"))
    p.add_argument(
        "--switch-interval",
        type=float,
        default=None,
        help="sys.setswitchinterval for the run, in seconds (Python's default is 0.005)",
    )
    args = p.parse_args()
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval)
    steps = Steps()
    logging.getLogger("services.gpu_agent.engine.engine").addHandler(steps)
    logging.getLogger("services.gpu_agent.engine.engine").setLevel(logging.INFO)
    engine = build_engine(model_folder(args.model), "auto", args.device, args.decoders, 128, 400)
    engine._batcher.step_tokens = CUDA_STEP_TOKENS
    profile = LatencyProfile.load(args.profile)
    try:
        asyncio.run(drive(engine, args.decoders, [128] * 3))  # warm: graphs for the batch sizes
        steps.rows.clear()
        engine_module.STEP_LOG = True
        forward, python_profile = engine._forward, cProfile.Profile()

        repeats: dict[tuple[int, int], list[float]] = {}
        profiled: list[tuple[int, int]] = []
        torch_profile = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        )

        def profiled_forward(plan, num_decode):  # only the mixed steps
            mixed = 0 < num_decode < len(plan)
            if mixed and args.cprofile:
                python_profile.enable()
            try:
                out = forward(plan, num_decode)
            finally:
                if mixed and args.cprofile:
                    python_profile.disable()
            if mixed and args.repeat:
                shape = (num_decode // 16 * 16, sum(item.count for item in plan[num_decode:]))
                for i in range(args.repeat):
                    torch.cuda.synchronize()
                    began = time.perf_counter()
                    if args.torch_profile and i == args.repeat - 1 and shape == (64, 128) and not profiled:
                        profiled.append(shape)  # one step: a profiler runs once
                        with torch_profile:
                            out = forward(plan, num_decode)
                    else:
                        out = forward(plan, num_decode)
                    torch.cuda.synchronize()
                    repeats.setdefault(shape, []).append(1e3 * (time.perf_counter() - began))
            return out

        engine._forward = profiled_forward
        asyncio.run(drive(engine, args.decoders, [128, 512, 1024, 2048, 128, 512, 1024, 2048] + [128] * 10))
        engine._forward = forward
        engine_module.STEP_LOG = False
        if args.cprofile:
            pstats.Stats(python_profile).sort_stats("tottime").print_stats(25)
        if args.torch_profile and args.repeat:
            averages = torch_profile.key_averages()
            print(averages.table(sort_by="self_cpu_time_total", row_limit=25))
            kernel_us = sum(e.self_device_time_total for e in averages)
            print(f"kernel time of the profiled step (64 decoding, 128 prefill tokens): {kernel_us / 1e3:.2f} ms")
        if repeats:
            print(f"{'decode':>6s} {'prefill':>7s} {'repeats':>7s} {'median ms':>9s} {'min ms':>7s}")
            for (decode, prefill), times in sorted(repeats.items()):
                print(f"{decode:6d} {prefill:7d} {len(times):7d} {statistics.median(times):9.2f} {min(times):7.2f}")
        kv = engine.kv_bytes_per_token
        groups: dict[tuple, list[tuple[int, float]]] = {}
        for decode, prefill, seqs, kind, ms in steps.rows:
            groups.setdefault((kind, decode // 16 * 16, prefill), []).append((decode, ms))
        print(f"{'kind':6s} {'decode':>6s} {'prefill':>7s} {'steps':>5s} {'real ms':>8s} {'profile ms':>10s}")
        for (kind, _, prefill), rows in sorted(groups.items()):
            decode = round(statistics.mean(d for d, _ in rows))
            # the decoders' context: 128 prompt tokens and about half their output so far
            priced = 1e3 * profile.step_s(
                engine.weight_bytes, decode, decode * (128 + 200) * kv, prefill, 1 if prefill else 0
            )
            real = statistics.median(ms for _, ms in rows)
            print(f"{kind:6s} {decode:6d} {prefill:7d} {len(rows):5d} {real:8.2f} {priced:10.2f}")
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
