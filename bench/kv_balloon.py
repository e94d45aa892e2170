"""KV balloon: how fast an engine's KV memory grows and shrinks by 10 GiB
while it serves.

One dummy-weight engine (Llama-3.1-8B config by default) on one GPU serves a
steady load of streaming requests. Meanwhile:
  grow    raise the limit by 10 GiB, then map 10 GiB of KV slots
          (the pool's own page mapping, timed under the engine's lock);
  shrink  free those slots and lower the limit by 10 GiB: time until the
          memory is back with the driver;
  squeeze lower the limit below what the running requests hold: time until
          the engine has preempted down to it (status "applied") and the
          memory is back; every request still completes.
GPU memory is read from the driver (cudaMemGetInfo) before and after.

    python bench/kv_balloon.py [--model llama-3.1-8b] [--gib 10] [--json out.json]"""

from __future__ import annotations

import argparse
import asyncio
import time

import common  # first: puts the project on sys.path
import torch
from common import environment, table, write_json

from services.gpu_agent.engine import Engine, GenerationRequest

GIB = 1 << 30


def driver_used() -> int:
    free, total = torch.cuda.mem_get_info()
    return total - free


async def wait_for(predicate, timeout_s: float = 30.0, poll_s: float = 0.0005) -> float:
    start = time.perf_counter()
    while not predicate():
        if time.perf_counter() - start > timeout_s:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(poll_s)
    return time.perf_counter() - start


async def serve(
    engine: Engine, stop: asyncio.Event, results: dict, prompt_words: int, max_tokens: int, index: int
) -> None:
    """One client: requests back to back until told to stop."""
    n = 0
    while not stop.is_set():
        req = GenerationRequest(
            f"load-{index}-{n}", prompt="hello " * prompt_words, max_tokens=max_tokens, temperature=0.0, ignore_eos=True
        )
        tokens = 0
        try:
            async for out in engine.generate(req):
                tokens += len(out.token_ids)
            results["completed"] += 1
            results["tokens"] += tokens
        except Exception as exc:  # counted: a balloon must not fail requests
            results["errors"].append(f"{type(exc).__name__}: {exc}")
        n += 1


async def run(model: str, gib: int, clients: int) -> dict:
    path = common.ROOT / "bench" / "configs" / model
    engine = Engine(
        path, name=model, load_format="dummy", dtype="bfloat16", device="cuda:0", memory_limit_bytes=8 * GIB
    )
    engine.start()
    pool = engine._batcher.pool  # the bench times the pool's own map/unmap under the engine's lock
    stop = asyncio.Event()
    results = {"completed": 0, "tokens": 0, "errors": []}
    # The dummy model has no tokenizer.json: bytes are tokens, so 50 words are 300 tokens.
    load = [asyncio.create_task(serve(engine, stop, results, 50, 600, i)) for i in range(clients)]
    row: dict = {
        "model": model,
        "pool": type(pool).__name__,
        "gib": gib,
        "clients": clients,
        "kv_token_bytes": engine.kv_bytes_per_token,
    }
    try:
        await wait_for(lambda: engine.stats().running_requests >= clients // 2, timeout_s=60)
        await asyncio.sleep(1.0)
        print(f"serving: {engine.stats()}", flush=True)
        base_limit = engine.stats().memory_limit_bytes
        used_before = driver_used()
        row["serving_mapped_gb"] = engine.stats().kv_mapped_bytes / 1e9

        # grow: the limit, then the pages
        start = time.perf_counter()
        state = engine.set_memory_limit(base_limit + gib * GIB)
        row["grow_limit_s"] = time.perf_counter() - start
        tokens = gib * GIB // engine.kv_bytes_per_token
        with engine._lock:
            start = time.perf_counter()
            slots = pool.alloc(tokens)
            torch.cuda.synchronize()
            row["grow_map_s"] = time.perf_counter() - start
        if slots is None:
            raise RuntimeError(f"could not map {gib} GiB of KV (limit state {state})")
        row["grow_driver_gb"] = (driver_used() - used_before) / 1e9
        row["grow_s"] = row["grow_limit_s"] + row["grow_map_s"]

        # shrink: give the pages back, then the limit
        used_grown = driver_used()
        with engine._lock:
            start = time.perf_counter()
            pool.free(slots)
            if hasattr(pool, "trim"):
                pool.trim()
            torch.cuda.synchronize()
            row["shrink_unmap_s"] = time.perf_counter() - start
        start = time.perf_counter()
        engine.set_memory_limit(base_limit)
        row["shrink_limit_s"] = time.perf_counter() - start
        row["shrink_driver_gb"] = (used_grown - driver_used()) / 1e9
        row["shrink_s"] = row["shrink_unmap_s"] + row["shrink_limit_s"]

        # squeeze: below what the running requests hold
        mapped = engine.stats().kv_mapped_bytes
        used_squeeze = driver_used()
        target = mapped // 4
        start = time.perf_counter()
        state = engine.set_memory_limit(target)
        row["squeeze_status"] = state.status
        row["squeeze_applied_s"] = await wait_for(lambda: engine.stats().memory_limit_status == "applied")
        row["squeeze_from_gb"], row["squeeze_to_gb"] = mapped / 1e9, engine.stats().kv_mapped_bytes / 1e9
        if hasattr(pool, "trim"):
            with engine._lock:
                pool.trim()
        row["squeeze_driver_gb"] = (used_squeeze - driver_used()) / 1e9
        engine.set_memory_limit(base_limit)
        await asyncio.sleep(2.0)  # preempted requests come back and run on
    except BaseException:
        print(f"failed after measuring {row}", flush=True)
        raise
    finally:
        stop.set()
        await asyncio.gather(*load)
        engine.stop()
    row["completed"], row["errors"] = results["completed"], len(results["errors"])
    row["error_samples"] = results["errors"][:3]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-3.1-8b")
    parser.add_argument("--gib", type=int, default=10)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kv_balloon.py needs a CUDA GPU")
    row = asyncio.run(run(args.model, args.gib, args.clients))
    print(
        table(
            [row],
            [
                ("model", "model", ""),
                ("pool", "pool", ""),
                ("serving_mapped_gb", "serving GB", ".2f"),
                ("grow_limit_s", "limit+ s", ".4f"),
                ("grow_map_s", "map s", ".4f"),
                ("grow_driver_gb", "mapped GB", ".2f"),
                ("shrink_unmap_s", "unmap s", ".4f"),
                ("shrink_driver_gb", "freed GB", ".2f"),
                ("squeeze_applied_s", "squeeze s", ".4f"),
                ("squeeze_driver_gb", "squeezed GB", ".2f"),
                ("completed", "completed", "d"),
                ("errors", "errors", "d"),
            ],
        )
    )
    write_json(args.json, {"benchmark": "kv_balloon", "environment": environment(), "results": [row]})


if __name__ == "__main__":
    main()
