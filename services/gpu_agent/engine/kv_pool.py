"""The KV pool: one engine's key/value memory, shared by all its sequences,
whose physical size follows a limit that can change while the engine runs.

The interface is kvcached's (see kvcached_pool.py for the CUDA pool built on
it): a large virtual reservation of token slots, per-layer key and value
buffers indexed by slot ([slots, kv_heads, head_dim]), `alloc(n)` -> n slot
indices or None, `free(slots)`, and a memory limit set with a revision.
Physical memory is mapped in pages: a page is `page_bytes` of every layer's
key and value buffer, so one page holds `tokens_per_page` slots and costs
`page_bytes * layers * 2` bytes (a "bundle"). A page is mapped when a slot in
it is first allocated and unmapped when its last slot is freed; the limit
caps mapped bytes, rounded down to whole bundles.

Lowering the limit below what is mapped cannot take memory that sequences
hold: the new limit is then "deferred" (no new page is mapped) until frees
bring the mapped bytes under it, and the engine preempts sequences to get
there. Revisions order limits from several senders: an older revision is
"stale" and ignored; the same revision with another limit is a "conflict".

`PagePool` here is the pool for the CPU (and for CUDA hosts without
kvcached): its buffers are one ordinary allocation each, but on the CPU
unmapping is real: the page's host memory is handed back to the kernel
(madvise MADV_DONTNEED) and comes back zero-filled on next use, so the
process's resident memory follows the pool's mapped bytes."""

from __future__ import annotations

import ctypes
import heapq
import mmap
import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch

DEFAULT_PAGE_BYTES = 2 * 1024 * 1024  # kvcached's page: 2 MiB of each layer's K and V buffer


@dataclass(frozen=True)
class KVGeometry:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def slot_bytes_per_buffer(self) -> int:
        """One token's bytes in one layer's K (or V) buffer."""
        return self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def token_bytes(self) -> int:
        """One token's bytes over all layers, keys and values."""
        return 2 * self.num_layers * self.slot_bytes_per_buffer


def page_bundle_bytes(geometry: KVGeometry, page_bytes: int) -> int:
    """The physical cost of one page of `page_bytes` in each K and V buffer,
    in whole tokens: the granularity of a pool's limit."""
    return max(1, page_bytes // geometry.slot_bytes_per_buffer) * geometry.token_bytes


@dataclass(frozen=True)
class MemoryLimitState:
    status: str  # "applied", "deferred" (waiting for frees), "stale" or "conflict" (request ignored)
    limit_bytes: int  # as asked
    effective_limit_bytes: int  # rounded down to whole page bundles, capped at the reservation
    mapped_bytes: int
    revision: int


class KVPool(ABC):
    """What the engine needs of a KV pool. Not thread safe: the engine calls
    it under its own lock."""

    geometry: KVGeometry
    capacity_tokens: int  # virtual slots
    tokens_per_page: int
    k_buffers: list[torch.Tensor]  # per layer, [capacity_tokens, kv_heads, head_dim] (a row more with a padding slot)
    v_buffers: list[torch.Tensor]
    # A slot never handed out, which the padded rows of a CUDA graph's batch write (cuda_graphs.py);
    # None: the pool has none, and decode graphs cannot run on it.
    padding_slot: int | None = None

    @abstractmethod
    def alloc(self, n: int) -> list[int] | None:
        """n free slots, or None (and nothing allocated) if the limit or the
        reservation does not allow them."""

    @abstractmethod
    def free(self, slots: list[int]) -> None: ...

    @abstractmethod
    def set_memory_limit(self, limit_bytes: int, revision: int) -> MemoryLimitState: ...

    @abstractmethod
    def limit_state(self) -> MemoryLimitState: ...

    @property
    @abstractmethod
    def used_tokens(self) -> int: ...

    @property
    @abstractmethod
    def free_tokens(self) -> int:
        """Slots that alloc() can still hand out under the current limit."""

    def close(self) -> None:
        """Gives all memory back; the pool is unusable afterwards."""

    # ---- derived -----------------------------------------------------------

    @property
    def bundle_bytes(self) -> int:
        """The physical cost of one page: its share of every K and V buffer."""
        return self.tokens_per_page * self.geometry.token_bytes

    @property
    def used_bytes(self) -> int:
        return self.used_tokens * self.geometry.token_bytes

    @property
    @abstractmethod
    def held_bytes(self) -> int:
        """The pages holding slots, whole: used_bytes rounded up to the pages the slots are spread over,
        which a freed slot gives back only once its page has no other. A limit below it preempts."""

    def held_bytes_excluding(self, cache_only_in_page: Mapping[int, int]) -> int:
        """held_bytes less the pages whose used slots the prefix cache alone keeps (page -> how many
        slots on it are such): what requests hold. A pool that cannot tell how many slots of a page
        are used counts only pages the cache fills whole: never less than requests hold."""
        whole = sum(1 for n in cache_only_in_page.values() if n >= self.tokens_per_page)
        return max(0, self.held_bytes - whole * self.bundle_bytes)

    @property
    def mapped_bytes(self) -> int:
        return self.limit_state().mapped_bytes

    @property
    def limit_tokens(self) -> int:
        """Tokens the effective limit allows if nothing else held memory:
        whether one sequence can ever fit."""
        return self.limit_state().effective_limit_bytes // self.bundle_bytes * self.tokens_per_page

    @property
    def over_limit(self) -> bool:
        """Mapped memory above the limit (a deferred shrink): sequences must go."""
        state = self.limit_state()
        return state.mapped_bytes > state.effective_limit_bytes


def _release_host_memory(buffer: torch.Tensor, begin: int, end: int) -> None:
    """Hands the whole OS pages inside buffer's bytes [begin, end) back to the
    kernel; they read as zeros afterwards. A no-op where madvise is missing."""
    if _madvise is None:
        return
    base = buffer.data_ptr()
    start = -(-(base + begin) // mmap.PAGESIZE) * mmap.PAGESIZE
    stop = (base + end) // mmap.PAGESIZE * mmap.PAGESIZE
    if stop > start:
        _madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), _MADV_DONTNEED)


_MADV_DONTNEED = 4
_madvise = None
if sys.platform.startswith("linux"):
    try:
        _libc = ctypes.CDLL(None, use_errno=True)
        _madvise = _libc.madvise
        _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        _madvise = None


class PagePool(KVPool):
    """Pages over ordinary tensors. On the CPU the memory of an unmapped page
    is really returned (see the module doc); on CUDA (a host without kvcached)
    the whole reservation is allocated up front and only the accounting is
    elastic, so size `capacity_tokens` to the memory the engine may ever use.
    padding_slot: one row more in every buffer, outside the pages and never
    handed out, for CUDA graphs' padded rows to write (padding_slot is its index)."""

    def __init__(
        self,
        geometry: KVGeometry,
        capacity_tokens: int,
        limit_bytes: int,
        device: torch.device | str = "cpu",
        page_bytes: int = DEFAULT_PAGE_BYTES,
        padding_slot: bool = False,
    ):
        if capacity_tokens < 1:
            raise ValueError(f"capacity must be at least one token, got {capacity_tokens}")
        self.geometry = geometry
        self.device = torch.device(device)
        self.tokens_per_page = page_bundle_bytes(geometry, page_bytes) // geometry.token_bytes
        self.num_pages = -(-capacity_tokens // self.tokens_per_page)
        self.capacity_tokens = self.num_pages * self.tokens_per_page
        self.padding_slot = self.capacity_tokens if padding_slot else None
        shape = (self.capacity_tokens + int(padding_slot), geometry.num_kv_heads, geometry.head_dim)
        self.k_buffers = [self._buffer(shape) for _ in range(geometry.num_layers)]
        self.v_buffers = [self._buffer(shape) for _ in range(geometry.num_layers)]
        self._unmapped: list[int] = list(range(self.num_pages))  # a heap: lowest page first keeps memory compact
        self._free_in_page: dict[int, list[int]] = {}  # mapped page -> its free slots
        self._used_in_page: dict[int, int] = {}  # mapped page -> slots in use
        self._used_tokens = 0
        self._limit_bytes = int(limit_bytes)
        self._revision = 0
        self._effective = self._effective_limit(self._limit_bytes)

    def _buffer(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self.device.type != "cpu":
            return torch.empty(shape, dtype=self.geometry.dtype, device=self.device)
        # Aligned to the OS page so a pool page maps onto whole OS pages; large
        # allocations are mmap'ed by the allocator, so untouched pages cost nothing.
        nbytes = shape[0] * self.geometry.slot_bytes_per_buffer
        raw = torch.empty(nbytes + mmap.PAGESIZE, dtype=torch.uint8)
        skip = -raw.data_ptr() % mmap.PAGESIZE
        return raw[skip : skip + nbytes].view(self.geometry.dtype).view(shape)

    def _effective_limit(self, limit_bytes: int) -> int:
        return min(max(0, limit_bytes) // self.bundle_bytes, self.num_pages) * self.bundle_bytes

    @property
    def _mapped_pages(self) -> int:
        return len(self._used_in_page)

    # ---- slots -------------------------------------------------------------

    def alloc(self, n: int) -> list[int] | None:
        if n <= 0:
            return []
        free_mapped = sum(len(s) for s in self._free_in_page.values())
        new_pages = max(0, -(-(n - free_mapped) // self.tokens_per_page))
        if new_pages > len(self._unmapped) or (
            new_pages and (self._mapped_pages + new_pages) * self.bundle_bytes > self._effective
        ):
            return None
        for _ in range(new_pages):
            page = heapq.heappop(self._unmapped)
            first = page * self.tokens_per_page
            self._free_in_page[page] = list(range(first + self.tokens_per_page - 1, first - 1, -1))
            self._used_in_page[page] = 0
        slots: list[int] = []
        for page in sorted(self._free_in_page):
            free = self._free_in_page[page]
            take = min(len(free), n - len(slots))
            for _ in range(take):
                slots.append(free.pop())
            self._used_in_page[page] += take
            if not free:
                del self._free_in_page[page]
            if len(slots) == n:
                break
        self._used_tokens += n
        return slots

    def free(self, slots: list[int]) -> None:
        for slot in slots:
            page = slot // self.tokens_per_page
            used = self._used_in_page.get(page, 0)
            if used <= 0:
                raise ValueError(f"slot {slot} is not allocated")
            self._free_in_page.setdefault(page, []).append(slot)
            self._used_in_page[page] = used - 1
            self._used_tokens -= 1
            if used == 1:
                self._unmap(page)

    def _unmap(self, page: int) -> None:
        del self._used_in_page[page]
        del self._free_in_page[page]
        heapq.heappush(self._unmapped, page)
        if self.device.type == "cpu":
            span = self.tokens_per_page * self.geometry.slot_bytes_per_buffer
            for buffer in (*self.k_buffers, *self.v_buffers):
                _release_host_memory(buffer, page * span, (page + 1) * span)

    @property
    def used_tokens(self) -> int:
        return self._used_tokens

    @property
    def held_bytes(self) -> int:
        # A page is mapped while any slot on it is used (free unmaps it with its last).
        return self._mapped_pages * self.bundle_bytes

    def held_bytes_excluding(self, cache_only_in_page: Mapping[int, int]) -> int:
        cache_only = sum(1 for page, n in cache_only_in_page.items() if n >= self._used_in_page.get(page, 0))
        return max(0, self.held_bytes - cache_only * self.bundle_bytes)

    @property
    def free_tokens(self) -> int:
        free_mapped = sum(len(s) for s in self._free_in_page.values())
        mappable = min(len(self._unmapped), max(0, self._effective // self.bundle_bytes - self._mapped_pages))
        return free_mapped + mappable * self.tokens_per_page

    # ---- the limit ---------------------------------------------------------

    def set_memory_limit(self, limit_bytes: int, revision: int) -> MemoryLimitState:
        if limit_bytes < 0 or revision < 0:
            raise ValueError(f"limit and revision must be non-negative, got {limit_bytes}, {revision}")
        if revision < self._revision:
            return self._state("stale")
        if revision == self._revision:
            return self._state(None if limit_bytes == self._limit_bytes else "conflict")
        self._limit_bytes, self._revision = int(limit_bytes), int(revision)
        self._effective = self._effective_limit(self._limit_bytes)
        return self._state()

    def limit_state(self) -> MemoryLimitState:
        return self._state()

    def _state(self, status: str | None = None) -> MemoryLimitState:
        mapped = self._mapped_pages * self.bundle_bytes
        if status is None:
            status = "deferred" if mapped > self._effective else "applied"
        return MemoryLimitState(status, self._limit_bytes, self._effective, mapped, self._revision)

    def close(self) -> None:
        self.k_buffers, self.v_buffers = [], []
        self._unmapped, self._free_in_page, self._used_in_page = [], {}, {}
