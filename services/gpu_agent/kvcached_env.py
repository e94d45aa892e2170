"""The environment kvcached runs under in the agent's engines (built-in workers, inline engines, SGLang).

kvcached maps a KV page only while the card has more than (1 - KVCACHED_GPU_UTILIZATION) of its
memory free (kvcached 0.1.6, PageAllocator::get_avail_physical_pages; default 0.95: 4 GB of an H100).
The agent keeps its own reserve out of the KV budget (the memory coordinator's: what the device's
processes were measured to hold beyond weights and KV, plus a margin), so kvcached's headroom came on
top of it: the limits the agent planned summed to memory no engine could map. On an H100 running 12
models (2026-12-07, bench/one_gpu.py) every one of the 34,541 steps whose queue waited for KV had room
under its limit and not on the card: an engine waited 12.7 s with room for 31,077 tokens under its
limit and 356 mappable. So the agent turns kvcached's headroom off unless the operator set one."""

from __future__ import annotations

import os
from collections.abc import Mapping

GPU_UTILIZATION_ENV = "KVCACHED_GPU_UTILIZATION"
# kvcached may map pages until the card is full: the agent's reserve is the headroom.
AGENT_GPU_UTILIZATION = "1.0"


def with_agent_accounting(env: Mapping[str, str]) -> dict[str, str]:
    """`env` with kvcached's headroom off, unless it names one already."""
    out = dict(env)
    out.setdefault(GPU_UTILIZATION_ENV, AGENT_GPU_UTILIZATION)
    return out


def apply_to_this_process() -> None:
    """For engines run in the agent's own process (inline): before kvcached is imported, which reads
    the variable once (its Python module at import, its native library when loaded)."""
    os.environ.setdefault(GPU_UTILIZATION_ENV, AGENT_GPU_UTILIZATION)
