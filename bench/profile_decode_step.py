"""Where a decode step's time goes: the engine's host phases and the GPU's kernels.

For one model (bench/configs name or folder) and one batch, on CUDA: the
engine with dummy bf16 weights decodes a warm-up round, then a timed round
during which each host phase of the step loop is timed with the wall clock
(scheduling, the slot table, the graph launch, sampling with its wait for the
GPU, appending the tokens and delivering them), and a third round under
torch.profiler, whose kernel table (device time per step, launches per step)
shows what the GPU runs. Prints two tables; --json writes them.

    python bench/profile_decode_step.py [--model llama-3.2-1b] [--batch 1] [--new-tokens 64]"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import time

import common  # noqa: F401  first: puts the project on sys.path
import torch
from common import write_json
from decode_throughput import build_engine, decode_round, model_folder, prompt_of_length

import services.gpu_agent.engine.engine as engine_module


def timed(totals: dict, name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start

    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.2-1b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--attention", default="triton", help="triton (CUDA graphs), torch or auto")
    parser.add_argument("--kernels", type=int, default=40, help="rows of the kernel table")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    folder = model_folder(args.model)
    engine = build_engine(folder, args.attention, args.device, args.batch, args.prompt_tokens, args.new_tokens)
    try:
        prompt = prompt_of_length(engine, args.prompt_tokens)

        def round_(tag: str) -> dict:
            return asyncio.run(decode_round(engine, prompt, args.prompt_tokens, args.batch, args.new_tokens, tag))

        round_("warmup")
        totals: dict[str, float] = collections.defaultdict(float)
        counts: dict[str, int] = collections.defaultdict(int)
        patches = [
            (engine._batcher, "schedule", "schedule"),
            (engine._runner.slot_table, "rows_for", "rows_for"),
            (engine._runner, "_graph_decode", "graph_decode (launch)"),
            (engine, "_append_token", "append_token (detokenize, deliver)"),
        ]
        patches = [(obj, attr, name) for obj, attr, name in patches if obj is not None]
        for obj, attr, name in patches:
            setattr(obj, attr, timed(totals, name, getattr(obj, attr)))
        step = engine._step

        def counted_step():
            counts["steps"] += 1
            return step()

        engine._step = timed(totals, "step (all)", counted_step)
        sample_batch = engine_module.sample_batch
        engine_module.sample_batch = timed(totals, "sample_batch (waits for the GPU)", sample_batch)
        try:
            result = round_("timed")
        finally:
            engine_module.sample_batch = sample_batch
            for obj, attr, _ in [*patches, (engine, "_step", "")]:
                delattr(obj, attr)  # the class's method again
        steps = max(counts["steps"], 1)
        runner = engine._runner.graph_runner
        gpu_ms = (
            sorted(runner.replay_gpu_ms)[len(runner.replay_gpu_ms) // 2] if runner and runner.replay_gpu_ms else None
        )
        print(
            f"{folder.name} batch {args.batch}: client step {result['step_s'] * 1e3:.3f} ms, "
            f"graph GPU {gpu_ms if gpu_ms is None else round(gpu_ms, 3)} ms, {steps} engine steps"
        )
        phases = {name: seconds / steps * 1e3 for name, seconds in sorted(totals.items())}
        for name, ms in phases.items():
            print(f"  {name:40s} {ms:8.3f} ms/step")

        activity = (
            torch.profiler.ProfilerActivity.CUDA
            if torch.device(args.device).type == "cuda"
            else torch.profiler.ProfilerActivity.CPU
        )
        with torch.profiler.profile(activities=[activity]) as prof:
            round_("profiled")
        events = [
            e
            for e in prof.key_averages()
            if activity == torch.profiler.ProfilerActivity.CPU or e.device_type == torch.autograd.DeviceType.CUDA
        ]
        events.sort(key=lambda e: -e.self_device_time_total)
        per_step = args.new_tokens - 1
        kernels = [
            {
                "name": e.key[:90],
                "calls_per_step": e.count / per_step,
                "us_per_step": e.self_device_time_total / per_step,
            }
            for e in events
        ]
        total_us = sum(k["us_per_step"] for k in kernels)
        print(
            f"kernels: {sum(k['calls_per_step'] for k in kernels):.1f} launches and {total_us:.1f} us of device "
            f"time a step (prefill included, spread over {per_step} steps)"
        )
        for k in kernels[: args.kernels]:
            print(f"  {k['us_per_step']:8.1f} us {k['calls_per_step']:7.1f}x  {k['name']}")
        write_json(
            args.json,
            {
                "model": folder.name,
                "batch": args.batch,
                "client_step_ms": result["step_s"] * 1e3,
                "graph_gpu_ms": gpu_ms,
                "phases_ms": phases,
                "kernels": kernels,
            },
        )
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
