"""Warm start: time from "load model X" to its first generated token, with
the engine in a new worker process (cold) or in a pre-started, device-
initialized spare (warm, services/gpu_agent/workers/).

  cold  WorkerPool with no spares: start a worker process (interpreter,
        torch import, device warm-up), load the model into it, generate one token;
  warm  WorkerPool with one spare per device, already warm: take it, load,
        generate one token. (Taking it starts its replacement in the background,
        as in the agent, which competes for the host's cores meanwhile.)
  write  as warm, with the host weights written into a shared-memory file
        (the agent's default: a worker's copy outlives the worker);
  mapped as warm, into another spare, mapping the copy "write" left instead of
        loading the model (a worker that replaces a dead one, a reload).

Each row splits the total into start (process start + device init; for warm,
waiting for the ready spare), load (the Load call; "in worker": Engine(...)
inside the worker) and first token (a one-token greedy request).

    python bench/warm_start.py [--model DIR] [--load-format dummy] [--device cuda:0] [--repeats 3]
                               [--modes cold,warm,write,mapped] [--json out.json]
    python bench/warm_start.py --device cpu      # a tiny generated model, safetensors weights

Default model: bench/configs/llama-3.2-1b with dummy weights on cuda:0."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import common  # first: puts the project on sys.path
from common import environment, first_token_s, table, write_json

from services.gpu_agent.engine.shared_weights import default_shared_dir
from services.gpu_agent.workers.remote_engine import RemoteEngine
from services.gpu_agent.workers.worker_pool import WorkerPool

DEFAULT_MODEL = common.ROOT / "bench" / "configs" / "llama-3.2-1b"
COLUMNS = [
    ("mode", "mode", ""),
    ("start_s", "start s", ".3f"),
    ("load_s", "load s", ".3f"),
    ("worker_load_s", "in worker s", ".3f"),
    ("first_token_s", "1st token s", ".3f"),
    ("total_s", "total s", ".3f"),
    ("warmup_s", "device init s", ".3f"),
    ("import_s", "imports s", ".3f"),
]


MODES = ("cold", "warm", "write", "mapped")


async def load_to_first_token(pool: WorkerPool, args: argparse.Namespace, mode: str, shared_path: str = "") -> dict:
    t0 = time.perf_counter()
    worker = await pool.acquire(args.device)
    t1 = time.perf_counter()
    engine = await RemoteEngine.load(
        worker,
        args.model,
        name=Path(args.model).name,
        load_format=args.load_format,
        dtype=args.dtype,
        shared_weights_path=shared_path,
    )
    if mode == "mapped" and not engine.weights_attached:
        raise RuntimeError(f"the worker did not map {shared_path}; see its log")
    t2 = time.perf_counter()
    try:
        first = await first_token_s(engine)
    finally:
        await engine.stop()
    return {
        "mode": mode,
        "pid": worker.pid,
        "start_s": t1 - t0,
        "load_s": t2 - t1,
        "worker_load_s": engine.load_s,
        "first_token_s": first,
        "total_s": t1 - t0 + t2 - t1 + first,
        "warmup_s": worker.info.warmup_s,
        "import_s": worker.info.import_s,
        "spare_start_s": worker.start_s,
    }


async def run(args: argparse.Namespace) -> list[dict]:
    runs = []
    for i in range(args.repeats if "cold" in args.modes else 0):
        cold_pool = WorkerPool([args.device], spares_per_device=0)
        try:
            runs.append(await load_to_first_token(cold_pool, args, "cold"))
        finally:
            await cold_pool.close()
        print(f"cold {i + 1}/{args.repeats}: {runs[-1]['total_s']:.3f}s", flush=True)
    warm_pool = WorkerPool([args.device], spares_per_device=1)
    await warm_pool.start()
    shared_dir = Path(tempfile.mkdtemp(prefix="prism-bench-", dir=default_shared_dir()))
    try:
        for mode in [m for m in MODES[1:] if m in args.modes]:
            for i in range(args.repeats):
                shared_path = str(shared_dir / f"{i}.weights")
                if mode == "mapped" and not Path(shared_path).exists():  # write one to map
                    await warm_pool.wait_spares_ready()
                    await load_to_first_token(warm_pool, args, "write", shared_path)
                await warm_pool.wait_spares_ready()  # steady state: the spare finished warming up
                runs.append(await load_to_first_token(warm_pool, args, mode, shared_path if mode != "warm" else ""))
                print(f"{mode} {i + 1}/{args.repeats}: {runs[-1]['total_s']:.3f}s", flush=True)
    finally:
        await warm_pool.close()
        shutil.rmtree(shared_dir, ignore_errors=True)
    return runs


def medians(runs: list[dict]) -> list[dict]:
    rows = []
    for mode in MODES:
        of_mode = [r for r in runs if r["mode"] == mode]
        if not of_mode:
            continue
        rows.append({"mode": mode, **{key: statistics.median(r[key] for r in of_mode) for key, _, _ in COLUMNS[1:]}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model", default=None, help=f"model folder (default: {DEFAULT_MODEL}, or a tiny model on cpu)"
    )
    parser.add_argument("--load-format", default=None, help="auto | dummy (default: dummy for the default model)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cuda:0", help="cuda:N or cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default=",".join(MODES), help=f"which of {','.join(MODES)} to run")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.modes = [m for m in args.modes.split(",") if m]
    if not args.modes or set(args.modes) - set(MODES):
        parser.error(f"--modes: choose among {','.join(MODES)}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device} needs a CUDA GPU; use --device cpu")
    os.environ.setdefault("PRISM_LOG_LEVEL", "WARNING")  # the workers' logs, which would bury the table
    with tempfile.TemporaryDirectory(prefix="warm-start-") as scratch:
        if args.model is None and args.device == "cpu":
            from prism.tiny_models import write_tiny_model

            args.model = str(write_tiny_model(Path(scratch) / "tiny-llama", arch="llama"))
            args.load_format = args.load_format or "auto"
        elif args.model is None:
            args.model = str(DEFAULT_MODEL)
            args.load_format = args.load_format or "dummy"
        args.load_format = args.load_format or "auto"
        runs = asyncio.run(run(args))
    rows = medians(runs)
    print(f"\nmodel {args.model} ({args.load_format}) on {args.device}, median of {args.repeats}:")
    print(table(rows, COLUMNS))
    by_mode = {r["mode"]: r for r in rows}
    for faster, slower in (("warm", "cold"), ("mapped", "warm")):
        if faster in by_mode and slower in by_mode:
            a, b = by_mode[faster]["total_s"], by_mode[slower]["total_s"]
            print(f"{faster} saves {b - a:.3f}s of {slower}'s {b:.3f}s ({a / b:.0%} of {slower})")
    write_json(
        args.json,
        {
            "benchmark": "warm_start",
            "environment": environment(),
            "config": {
                "model": args.model,
                "load_format": args.load_format,
                "dtype": args.dtype,
                "device": args.device,
                "repeats": args.repeats,
                "modes": args.modes,
            },
            "results": rows,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    main()
