"""Which KV pool an engine runs on, how large it is, and making it.

An engine makes its pool when it loads and again on every activation where the
pool went with the weights (a PagePool on CUDA holds its whole reservation), so
the choice is made once, here, and kept: kvcached's elastic pool on CUDA where
kvcached is installed, the page pool (kv_pool.PagePool) everywhere else."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from services.gpu_agent.engine.errors import EngineError
from services.gpu_agent.engine.kv_pool import DEFAULT_PAGE_BYTES, KVGeometry, KVPool, PagePool, page_bundle_bytes
from services.gpu_agent.engine.kvcached_pool import KvcachedPool, kvcached_available

log = logging.getLogger(__name__)

KV_POOLS = ("auto", "kvcached", "pages")
DEFAULT_CONTEXTS_IN_MEMORY = 8  # default KV limit: this many full contexts
DEFAULT_CAPACITY_CONTEXTS = 32  # default virtual KV reservation on the CPU, at least
# Host pages are 4 KiB, so nothing forces kvcached's 2 MiB pages on the CPU;
# smaller pages let tiny models' limits mean something.
CPU_PAGE_BYTES = 64 * 1024


def choose_pool_kind(kind: str, device: torch.device) -> str:
    """ "kvcached" or "pages" for an engine asked for `kind` ("auto": kvcached where it runs)."""
    if kind not in KV_POOLS:
        raise EngineError(f"kv_pool {kind!r} is not one of {', '.join(KV_POOLS)}")
    if kind == "kvcached" and (device.type != "cuda" or not kvcached_available()):
        raise EngineError("kv_pool 'kvcached' needs CUDA and the kvcached package")
    if kind == "auto":
        return "kvcached" if device.type == "cuda" and kvcached_available() else "pages"
    return kind


def default_kv_limit_bytes(max_context: int, kv_bytes_per_token: int, bundle_bytes: int) -> int:
    """An engine's KV limit when none is given: DEFAULT_CONTEXTS_IN_MEMORY full
    contexts, in whole page bundles (a tiny model's are under one bundle)."""
    return -(-DEFAULT_CONTEXTS_IN_MEMORY * max_context * kv_bytes_per_token // bundle_bytes) * bundle_bytes


@dataclass(frozen=True)
class KVPoolFactory:
    """Makes one engine's KV pool, the same kind and size every time.

    kind: "kvcached" or "pages" (choose_pool_kind). page_bytes_asked: the page pool's page size (default:
    kvcached's 2 MiB on CUDA, CPU_PAGE_BYTES on the CPU; kvcached's own page size always for kvcached).
    capacity_bytes: the reservation the limit can grow to (default: the device's memory for kvcached,
    the limit for a page pool on CUDA, which allocates its reservation, and at least
    DEFAULT_CAPACITY_CONTEXTS contexts on the CPU). padding_slot: the page pool keeps a row for CUDA
    graphs' padded batches (kvcached always has one)."""

    kind: str
    geometry: KVGeometry
    device: torch.device
    max_context: int
    engine_name: str
    page_bytes_asked: int | None = None
    capacity_bytes: int | None = None
    padding_slot: bool = False

    @property
    def page_bytes(self) -> int:
        if self.kind == "kvcached":
            from kvcached.utils import PAGE_SIZE

            return PAGE_SIZE
        return self.page_bytes_asked or (CPU_PAGE_BYTES if self.device.type == "cpu" else DEFAULT_PAGE_BYTES)

    @property
    def bundle_bytes(self) -> int:
        """The granularity of the KV limit: one page in every K and V buffer."""
        return page_bundle_bytes(self.geometry, self.page_bytes)

    def capacity_tokens(self, limit_bytes: int) -> int:
        token_bytes = self.geometry.token_bytes
        if self.capacity_bytes:
            return max(1, self.capacity_bytes // token_bytes)
        if self.device.type == "cuda" and self.kind == "kvcached":
            return torch.cuda.get_device_properties(self.device).total_memory // token_bytes
        if self.device.type == "cuda":  # PagePool on CUDA allocates its reservation: no more than the limit
            return max(1, limit_bytes // token_bytes)
        return max(limit_bytes // token_bytes, DEFAULT_CAPACITY_CONTEXTS * self.max_context)

    def make(self, limit_bytes: int, revision: int) -> KVPool:
        """A new pool under `limit_bytes`, at `revision` (0: a new engine's first limit)."""
        capacity = self.capacity_tokens(limit_bytes)
        pool: KVPool
        if self.kind == "kvcached":
            pool = KvcachedPool(self.geometry, capacity, limit_bytes, self.device)
        else:
            pool = PagePool(
                self.geometry, capacity, limit_bytes, self.device, self.page_bytes, padding_slot=self.padding_slot
            )
        if revision:
            pool.set_memory_limit(limit_bytes, revision)
        log.info(
            "engine %s: KV pool of %d virtual slots (%.1f MB), %d slots a page, limit %.1f MB",
            self.engine_name,
            pool.capacity_tokens,
            pool.capacity_tokens * self.geometry.token_bytes / 1e6,
            pool.tokens_per_page,
            limit_bytes / 1e6,
        )
        return pool
