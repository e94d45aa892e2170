"""Probe: how much KV a kvcached pool can map under its limit when the card is nearly full, with
kvcached's own headroom (KVCACHED_GPU_UTILIZATION, default 0.95) and with the agent's setting (1.0,
services/gpu_agent/kvcached_env.py). Each case runs in a fresh process (kvcached reads the variable
once): a tensor fills the card to leave FREE_GIB free, then a pool of a Llama-3.2-1B's geometry with a
limit of LIMIT_GIB allocates 1,024-token sequences until it cannot. One line per case.

    python bench/probe/kvcached_headroom.py"""

from __future__ import annotations

import os
import subprocess
import sys

FREE_GIB = 3.0  # left free on the card: less than 5% of an H100 or H200
LIMIT_GIB = 2.0  # the pool's limit: fits in what is free
SEQUENCE_TOKENS = 1024
CASE_TIMEOUT_S = 30.0


def one_case() -> None:
    import torch

    from services.gpu_agent.engine.errors import CapacityError
    from services.gpu_agent.engine.kv_pool import KVGeometry
    from services.gpu_agent.engine.kvcached_pool import KvcachedPool

    free, total = torch.cuda.mem_get_info()
    filler = torch.empty(int(free - FREE_GIB * 2**30), dtype=torch.uint8, device="cuda")
    geometry = KVGeometry(num_layers=16, num_kv_heads=8, head_dim=64, dtype=torch.bfloat16)
    capacity = total // geometry.token_bytes  # as the engine sizes it (kv_pool_factory.py)
    shown = os.environ.get("KVCACHED_GPU_UTILIZATION", "(unset: 0.95)")
    try:
        pool = KvcachedPool(geometry, capacity, int(LIMIT_GIB * 2**30), "cuda")
    except CapacityError as exc:  # where kvcached would wait without end for the pool's first page
        print(f"KVCACHED_GPU_UTILIZATION={shown:>14}: refused: {exc}", flush=True)
        return
    sequences = 0
    while pool.alloc(SEQUENCE_TOKENS) is not None:
        sequences += 1
    mapped = sequences * SEQUENCE_TOKENS * geometry.token_bytes
    left = torch.cuda.mem_get_info()[0]
    print(
        f"KVCACHED_GPU_UTILIZATION={shown:>14}: "
        f"{sequences:4d} sequences of {SEQUENCE_TOKENS} tokens, {mapped / 2**30:.2f} GiB of KV under a "
        f"{LIMIT_GIB:g} GiB limit, the card {total / 2**30:.1f} GiB with {FREE_GIB:g} GiB free before, "
        f"{left / 2**30:.2f} after",
        flush=True,
    )
    del filler


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--case":
        one_case()
        return
    for value in (None, "1.0"):
        env = dict(os.environ)
        env.pop("KVCACHED_GPU_UTILIZATION", None)
        if value is not None:
            env["KVCACHED_GPU_UTILIZATION"] = value
        shown = value or "(unset: 0.95)"
        try:
            subprocess.run([sys.executable, __file__, "--case"], env=env, check=False, timeout=CASE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # kvcached waits, without end, for room to map even its null block: it sees no page free.
            print(f"KVCACHED_GPU_UTILIZATION={shown:>14}: no pool after {CASE_TIMEOUT_S:g} s", flush=True)


if __name__ == "__main__":
    main()
