"""The KV pool on CUDA: kvcached's virtual KV tensors, whose physical pages
are mapped through CUDA's virtual memory API as slots are allocated and
unmapped as they are freed, so an engine holds only the GPU memory its
sequences use, under a limit set at run time.

kvcached keeps one set of virtual tensors per (process, group id); each
engine in the process takes its own group id. Its page allocator works in
2 MiB pages of each layer's K and V tensor, like PagePool (kv_pool.py), which
mirrors these semantics on the CPU. Calls follow
kvcached.integration.sglang.interfaces (kvcached 0.1.6)."""

from __future__ import annotations

import itertools
import os
import threading

import torch

from services.gpu_agent.engine.errors import CapacityError
from services.gpu_agent.engine.kv_pool import KVGeometry, KVPool, MemoryLimitState, page_bundle_bytes

_next_group = itertools.count()
_init_lock = threading.Lock()
# kvcached maps a page only while more than (1 - this) of the card stays free (its default 0.95; the
# agent sets 1.0: services/gpu_agent/kvcached_env.py).
UTILIZATION_ENV, DEFAULT_UTILIZATION = "KVCACHED_GPU_UTILIZATION", 0.95


def pool_shortfall_bytes(free_bytes: int, total_bytes: int, first_page_bytes: int, utilization: float) -> int:
    """What the card lacks for kvcached to map a new pool's first page (its null block, which it
    reserves before the pool serves anything): that page beside the headroom kvcached keeps free,
    (1 - utilization) of the card. Short of it, kvcached waits for the page without end (kvcached
    0.1.6, KVCacheManager._reserve_null_block: on an H100 with 3 GiB free and the default headroom,
    70 s until the probe's call ended, bench/results/kvcached_headroom-h100.txt)."""
    headroom = int(max(0.0, 1.0 - utilization) * total_bytes)
    return max(0, first_page_bytes + headroom - free_bytes)


def kvcached_available() -> bool:
    try:
        import kvcached.integration.sglang.interfaces  # noqa: F401
    except Exception:  # ImportError, or a broken native build
        return False
    return torch.cuda.is_available()


class KvcachedPool(KVPool):
    def __init__(self, geometry: KVGeometry, capacity_tokens: int, limit_bytes: int, device: torch.device | str):
        from kvcached.integration.sglang import interfaces as kvi
        from kvcached.utils import PAGE_SIZE

        self.geometry = geometry
        self.device = torch.device(device)
        # kvcached's own unit for limits and mapped bytes: a whole page of every K and V tensor.
        self._kvcached_bundle_bytes = PAGE_SIZE * 2 * geometry.num_layers
        self._check_room_for_first_page()
        self.group_id = next(_next_group)
        with _init_lock:
            kvi.init_kvcached(device=str(self.device))
        shape = (capacity_tokens, geometry.num_kv_heads, geometry.head_dim)
        self.k_buffers, self.v_buffers = kvi.alloc_kv_cache(
            shape,
            geometry.dtype,
            str(self.device),
            geometry.num_layers,
            page_size=1,
            attention_type="GQA",
            group_id=self.group_id,
        )
        # kvcached sizes the virtual tensors to the whole GPU; use what it gave.
        self.capacity_tokens = self.k_buffers[0].shape[0]
        self.padding_slot = 0  # kvcached keeps slot 0 mapped and never hands it out
        self.tokens_per_page = page_bundle_bytes(geometry, PAGE_SIZE) // geometry.token_bytes
        self._manager = kvi.get_kv_cache_manager(
            self.capacity_tokens,
            1,
            geometry.slot_bytes_per_buffer,
            geometry.num_layers,
            group_id=self.group_id,
            pool_name=f"prism-{self.group_id}",
        )
        self._used_tokens = 0
        self.set_memory_limit(limit_bytes, 0)

    def _check_room_for_first_page(self) -> None:
        """CapacityError, at once, where kvcached would wait without end to map the pool's first page."""
        free, total = torch.cuda.mem_get_info(self.device)
        utilization = float(os.environ.get(UTILIZATION_ENV, DEFAULT_UTILIZATION))
        short = pool_shortfall_bytes(free, total, self._kvcached_bundle_bytes, utilization)
        if short:
            raise CapacityError(
                f"no KV pool can be made on {self.device}: {free / 2**20:.0f} MiB of the card is free, and kvcached "
                f"maps the pool's first page ({self._kvcached_bundle_bytes / 2**20:.0f} MiB: a page of every "
                f"layer's K and V) only with {(1 - utilization) * total / 2**20:.0f} MiB left free beside it "
                f"({UTILIZATION_ENV}={utilization:g}): {short / 2**20:.0f} MiB short"
            )

    def alloc(self, n: int) -> list[int] | None:
        if n <= 0:
            return []
        if self._manager.available_size() < n:
            self._settle_deferred_shrink()  # a shrink left pending hides every free page
            if self._manager.available_size() < n:
                return None  # asked first: kvcached logs a warning for every failed alloc
        slots = self._manager.alloc(n)
        if slots is not None:
            self._used_tokens += n
        return slots

    def free(self, slots: list[int]) -> None:
        if slots:
            self._manager.free(list(slots))
            self._used_tokens -= len(slots)

    def set_memory_limit(self, limit_bytes: int, revision: int) -> MemoryLimitState:
        if limit_bytes < self._manager.memory_limit_state()["mapped_bytes"]:
            # kvcached's spare pre-mapped pages count against a shrink; unmapped
            # first, the shrink applies at once when the slots in use fit.
            self._manager.trim()
        self._manager.set_memory_limit(int(limit_bytes), revision=int(revision))
        return self.limit_state()

    def limit_state(self) -> MemoryLimitState:
        raw = self._manager.memory_limit_state()
        if raw["status"] == "deferred" and not self._inuse_over_limit(raw):
            self._settle_deferred_shrink()
            raw = self._manager.memory_limit_state()
        return self._to_state(raw)

    def _inuse_over_limit(self, raw: dict) -> bool:
        """Whether the pages holding slots (spare pre-mapped pages not counted)
        exceed the effective limit: only then must sequences give memory back."""
        inuse_bytes = self._manager.page_allocator.get_num_inuse_pages() * self._kvcached_bundle_bytes
        return inuse_bytes > int(raw["effective_limit_bytes"] or 0)

    def _settle_deferred_shrink(self) -> None:
        """kvcached completes a deferred shrink only inside free(). An engine
        with nothing left to free (idle, or already within the new limit because
        the spare pages were what stood over it) would wait forever, with free
        pages hidden from allocation; so finish it here, under kvcached's lock."""
        manager = self._manager
        if not manager.in_shrink:
            return
        manager.trim()
        with manager._lock:  # kvcached 0.1.6: the lock its @synchronized methods take
            manager._maybe_finish_shrink()

    @staticmethod
    def _to_state(raw: dict) -> MemoryLimitState:
        status = raw["status"]
        if status == "rejected":  # quarantined pages (a failed unmap) block the shrink: still waiting
            status = "deferred"
        return MemoryLimitState(
            status,
            int(raw["limit_bytes"] or 0),
            int(raw["effective_limit_bytes"] or 0),
            int(raw["mapped_bytes"]),
            int(raw["revision"]),
        )

    @property
    def used_tokens(self) -> int:
        return self._used_tokens

    @property
    def free_tokens(self) -> int:
        return int(self._manager.available_size())

    @property
    def held_bytes(self) -> int:
        # kvcached places each allocation on the best-fitting page, so a sequence's decode slots
        # spread over its neighbours' pages: its in-use pages, not its slots, are what it holds.
        return self._manager.page_allocator.get_num_inuse_pages() * self._kvcached_bundle_bytes

    @property
    def over_limit(self) -> bool:
        # kvcached counts its pre-mapped spare pages as mapped; whether sequences
        # must go is whether the pages in use exceed the target.
        raw = self._manager.memory_limit_state()
        return raw["status"] == "deferred" and self._inuse_over_limit(raw)

    @property
    def bundle_bytes(self) -> int:
        return self.tokens_per_page * self.geometry.token_bytes

    def trim(self) -> None:
        """Unmaps the pages kvcached pre-maps for fast allocation."""
        self._manager.trim()

    def close(self) -> None:
        self.k_buffers, self.v_buffers = [], []
        close = getattr(self._manager, "shutdown", None) or getattr(self._manager, "clear", None)
        if close is not None:
            close()
