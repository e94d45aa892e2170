"""Activation time of dummy-weight Llama engines against the physical floor.

For each model config in bench/configs (Llama-3.2-1B, 3B, Llama-3.1-8B), on
one GPU: load the built-in engine with dummy bf16 weights, then deactivate
and activate it several times. Each activation's time is split into
allocate / copy / ready; the floor is the weights' bytes over the pinned
host-to-device bandwidth measured in the same run. Also the time to the
first token of a request sent right after activation.

    python bench/activation.py [--repeats 5] [--engines builtin,sglang] [--json bench/results/activation.json]

With --engines sglang each config also runs as an SGLang server with
kvcached, through the agent's driver (SGLangEngine): its activation is
SGLang's /resume_memory_occupation (copy s) and one generated token
(ready s); its weights wait in SGLang's own CPU backup.

Targets: every built-in activation within 1.5x its floor, 8B under 0.5 s
(issue 3); every SGLang activation under 1.5 s (issue 23)."""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import common  # first: puts the project on sys.path
import torch
from common import environment, first_token_s, table, write_json

from services.gpu_agent.engine import Engine
from services.gpu_agent.host_checks import pinned_bandwidth

CONFIGS = ["llama-3.2-1b", "llama-3.2-3b", "llama-3.1-8b"]


def measure(name: str, repeats: int, bandwidth: float) -> dict:
    """The built-in engine, in this process."""
    path = common.ROOT / "bench" / "configs" / name
    load_start = time.perf_counter()
    engine = Engine(path, name=name, load_format="dummy", dtype="bfloat16", device="cuda:0", memory_limit_bytes=1 << 30)
    engine.start()
    load_s = time.perf_counter() - load_start
    try:
        asyncio.run(first_token_s(engine))  # warm-up: kernels compiled, allocator primed
        timings, deactivations, firsts = [], [], []
        for _ in range(repeats):
            start = time.perf_counter()
            engine.deactivate()
            deactivations.append(time.perf_counter() - start)
            free_inactive = torch.cuda.mem_get_info()[0]
            timings.append(engine.activate())
            firsts.append(asyncio.run(first_token_s(engine)))
        weight_bytes = engine.weight_bytes
    finally:
        engine.stop()
        torch.cuda.empty_cache()
    return summary(name, "builtin", weight_bytes, load_s, bandwidth, timings, deactivations, firsts, free_inactive)


async def measure_sglang(name: str, repeats: int, bandwidth: float, work_dir: Path, sglang_args: list[str]) -> dict:
    """An SGLang server with kvcached (SGLangEngine, the agent's driver): its activation is
    /resume_memory_occupation (copy s) and one generated token (ready s)."""
    from services.gpu_agent.sglang import SGLangEngine, SGLangLaunchConfig
    from services.gpu_agent.sglang.driver import DriverOptions

    folder = common.dummy_model_folder(name, work_dir)
    config = SGLangLaunchConfig(
        name=name, model_path=str(folder), load_format="dummy", dtype="bfloat16", extra_args=tuple(sglang_args)
    )
    load_start = time.perf_counter()
    engine = await SGLangEngine.start(
        config, memory_limit_bytes=1 << 30, options=DriverOptions(log_dir=work_dir / f"{name}-sglang-log")
    )
    load_s = time.perf_counter() - load_start
    try:
        await first_token_s(engine)
        timings, deactivations, firsts = [], [], []
        for _ in range(repeats):
            await engine.deactivate()
            deactivations.append(engine.last_deactivate_s)
            free_inactive = torch.cuda.mem_get_info()[0]
            timings.append(await engine.activate())
            firsts.append(await first_token_s(engine))
    finally:
        await engine.stop()
    return summary(
        name, "sglang", engine.weight_bytes, load_s, bandwidth, timings, deactivations, firsts, free_inactive
    )


def summary(
    name: str,
    engine: str,
    weight_bytes: int,
    load_s: float,
    bandwidth: float,
    timings: list,
    deactivations: list[float],
    firsts: list[float],
    free_inactive: int,
) -> dict:
    floor = weight_bytes / bandwidth
    med = lambda xs: statistics.median(xs)  # noqa: E731
    total = med([t.total_s for t in timings])
    return {
        "model": name,
        "engine": engine,
        "weight_gb": weight_bytes / 1e9,
        "load_s": load_s,
        "floor_s": floor,
        "activate_s": total,
        "activate_min_s": min(t.total_s for t in timings),
        "activate_max_s": max(t.total_s for t in timings),
        "allocate_s": med([t.allocate_s for t in timings]),
        "copy_s": med([t.copy_s for t in timings]),
        "ready_s": med([t.ready_s for t in timings]),
        "copy_gbps": med([t.copy_gbps for t in timings]),
        "ratio_to_floor": total / floor,
        "deactivate_s": med(deactivations),
        "first_token_after_s": med(firsts),
        "free_gb_while_inactive": free_inactive / 1e9,
        "within_1_5x_floor": total <= 1.5 * floor,
        "under_1_5_s": total < 1.5,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=CONFIGS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--engines", default="builtin", help="comma-separated: builtin (in this process), sglang (SGLang with kvcached)"
    )
    parser.add_argument(
        "--sglang-args",
        default="--attention-backend triton",
        help="more SGLang launch arguments (default: the Triton attention backend)",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    engines = args.engines.split(",")
    if unknown := set(engines) - {"builtin", "sglang"}:
        raise SystemExit(f"--engines: unknown {', '.join(sorted(unknown))} (builtin, sglang)")
    if not torch.cuda.is_available():
        raise SystemExit("activation.py needs a CUDA GPU")
    bandwidth = pinned_bandwidth(4 << 30, repeats=5)
    print(f"pinned host->device bandwidth: {bandwidth / 1e9:.1f} GB/s")
    rows = []
    with tempfile.TemporaryDirectory(prefix="prism-activation-") as work:
        for engine in engines:
            for name in args.models:
                if engine == "builtin":
                    rows.append(measure(name, args.repeats, bandwidth))
                else:
                    rows.append(
                        asyncio.run(measure_sglang(name, args.repeats, bandwidth, Path(work), args.sglang_args.split()))
                    )
                print(
                    f"{engine} {name}: activate {rows[-1]['activate_s']:.3f}s (floor {rows[-1]['floor_s']:.3f}s, "
                    f"load {rows[-1]['load_s']:.1f}s)",
                    flush=True,
                )
    print()
    print(
        table(
            rows,
            [
                ("engine", "engine", ""),
                ("model", "model", ""),
                ("weight_gb", "weights GB", ".2f"),
                ("floor_s", "floor s", ".3f"),
                ("activate_s", "activate s", ".3f"),
                ("activate_max_s", "max s", ".3f"),
                ("allocate_s", "alloc s", ".4f"),
                ("copy_s", "copy s", ".3f"),
                ("ready_s", "ready s", ".4f"),
                ("copy_gbps", "copy GB/s", ".1f"),
                ("ratio_to_floor", "x floor", ".2f"),
                ("deactivate_s", "deactivate s", ".4f"),
                ("first_token_after_s", "1st token s", ".3f"),
            ],
        )
    )
    for engine in engines:
        mine = [r for r in rows if r["engine"] == engine]
        eight_b = [r for r in mine if r["model"] == "llama-3.1-8b"]
        print(
            f"\n{engine}: all within 1.5x floor: {all(r['within_1_5x_floor'] for r in mine)}; "
            f"all under 1.5 s: {all(r['under_1_5_s'] for r in mine)}"
            + (f"; 8B under 0.5 s: {eight_b[0]['activate_s'] < 0.5}" if eight_b else "")
        )
    write_json(
        args.json,
        {
            "benchmark": "activation",
            "environment": environment(),
            "engines": engines,
            "sglang_args": args.sglang_args if "sglang" in engines else None,
            "pinned_bandwidth_gbps": bandwidth / 1e9,
            "results": rows,
        },
    )


if __name__ == "__main__":
    main()
