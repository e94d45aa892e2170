"""An SGLang instance's KV limit, through kvcached's shared-memory segment.

Read from kvcached 0.1.6 (the PyPI sdist: csrc/inc/mem_info_tracker.hpp,
csrc/page_allocator.cpp, kvcached/kv_cache_manager.py, kvcached/cli/utils.py,
kvcached/integration/sglang/interfaces.py). Each serving instance has a file
/dev/shm/<ipc name> of three native int64s, guarded by flock: the KV limit in
bytes (`total_size`, over all layers and both K and V, for one TP rank), the
bytes of the pages in use and the bytes of the pages kept mapped ahead
(prealloc). The <ipc name> is KVCACHED_IPC_NAME, sanitized to [A-Za-z0-9_-]
and 64 characters. When the KV pool starts, kvcached writes its whole
virtual capacity there as the limit; a watcher thread re-reads the limit
every 100 ms, and the next allocation resizes the pool to
limit // layers // 2 bytes per K or V buffer, in whole pages: growing at
once, shrinking once the pages in use fit (until then no new pages are
mapped). A limit of 0 is ignored (the allocation path applies only positive
targets), so a zero limit is written as layers x 2 bytes, which kvcached
reads as zero pages. `kvctl limit <ipc> <size>` is the same write. That is
the only way to change a running SGLang's limit from outside its process
(kvcached.control.set_instance_memory_limit, which takes revisions, works
only inside it), so the revisions live here, with the built-in engine's
semantics (kv_pool.py): an older revision is "stale" and ignored, the same
revision with another limit is a "conflict", a limit under the pages in use
is "deferred" until they fit.

Each tensor-parallel rank runs its own pool (kvcached 0.1.6 gives SGLang's
workers local pools, world_size 1) on the same segment, every rank with the
same capacity (the minimum over the ranks), so the limit written is the
engine's limit over its ranks (KV heads are split evenly), and usage read
back is one rank's times the ranks. Unverified with tp > 1: the ranks
overwrite each other's usage fields (all equal when their pools move
together). Hybrid models' other pools (sliding-window, Mamba) have segments
of their own, <ipc name>_g<n>, which the driver does not limit."""

from __future__ import annotations

import fcntl
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from services.gpu_agent.engine.errors import EngineError, InvalidRequestError
from services.gpu_agent.engine.kv_pool import MemoryLimitState

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
KVCACHED_PAGE_BYTES = 2 * 1024 * 1024  # kvcached's default page (KVCACHED_PAGE_SIZE_MB changes it)
_FIELDS = struct.Struct("=qqq")  # limit (kvcached's total_size), used, prealloc


class KvcachedSegmentError(EngineError):
    """The instance's kvcached segment is missing or unreadable."""


@dataclass(frozen=True)
class KvcachedUsage:
    """One rank's numbers as the segment holds them."""

    limit_bytes: int
    used_bytes: int
    prealloc_bytes: int

    @property
    def mapped_bytes(self) -> int:
        return self.used_bytes + self.prealloc_bytes


class KvcachedSegment:
    """The file kvcached shares with us. Never created here: a limit written
    to a file the engine does not read would be silently lost."""

    def __init__(self, ipc_name: str, shm_dir: Path = SHM_DIR):
        self.ipc_name = ipc_name
        self.path = Path(shm_dir) / ipc_name

    def read(self) -> KvcachedUsage | None:
        """None while the engine has not created it (or has removed it)."""
        try:
            with open(self.path, "rb") as f:
                fcntl.flock(f, fcntl.LOCK_SH)
                try:
                    data = f.read(_FIELDS.size)
                finally:
                    fcntl.flock(f, fcntl.LOCK_UN)
        except FileNotFoundError:
            return None
        if len(data) < _FIELDS.size:
            return None  # created but not yet written
        return KvcachedUsage(*_FIELDS.unpack(data))

    def write_limit(self, limit_bytes: int) -> KvcachedUsage:
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            raise KvcachedSegmentError(f"kvcached segment {self.path} is gone (the SGLang server exited?)") from None
        with os.fdopen(fd, "r+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                data = f.read(_FIELDS.size)
                if len(data) < _FIELDS.size:
                    raise KvcachedSegmentError(
                        f"kvcached segment {self.path} holds {len(data)} bytes, not {_FIELDS.size}"
                    )
                _, used, prealloc = _FIELDS.unpack(data)
                f.seek(0)
                f.write(struct.pack("=q", int(limit_bytes)))
                f.flush()
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return KvcachedUsage(int(limit_bytes), used, prealloc)

    def remove(self) -> bool:
        """Unlinks the file (kvcached does at a clean exit; not after SIGKILL)."""
        try:
            self.path.unlink()
            return True
        except FileNotFoundError:
            return False


class KvcachedLimit:
    """The engine's KV limit with revisions, applied through the segment."""

    def __init__(
        self,
        segment: KvcachedSegment,
        bundle_bytes_per_rank: int,
        tp_size: int = 1,
        page_bytes: int = KVCACHED_PAGE_BYTES,
    ):
        """bundle_bytes_per_rank: one kvcached page of every layer's K and V
        buffer on one rank (page_bytes x layers x 2)."""
        if bundle_bytes_per_rank < 1 or tp_size < 1 or page_bytes < 1 or bundle_bytes_per_rank % page_bytes:
            raise ValueError("bundle bytes, tp size and page bytes must be positive, the bundle whole pages")
        self.segment = segment
        self.tp_size = tp_size
        self.rank_bundle_bytes = bundle_bytes_per_rank
        # The smallest value kvcached does not ignore: 1 byte per K or V buffer of each layer, i.e. zero pages.
        self.zero_limit_bytes = bundle_bytes_per_rank // page_bytes
        self.capacity_bytes = 0  # over all ranks; known once attached
        self._limit = 0
        self._effective = 0
        self._revision = 0
        self._attached = False

    @property
    def bundle_bytes(self) -> int:
        """The limit's granularity over all ranks."""
        return self.rank_bundle_bytes * self.tp_size

    def attach(self, initial_limit_bytes: int) -> MemoryLimitState | None:
        """Takes the segment's first limit (the pool's whole virtual capacity,
        written by kvcached when the pool starts) as the capacity, then applies
        the initial limit at revision 0 (0: none, the whole capacity). None
        while there is no segment yet."""
        usage = self.segment.read()
        if usage is None:
            return None
        self.capacity_bytes = max(0, usage.limit_bytes) * self.tp_size
        self._attached = True
        self._limit, self._revision = int(initial_limit_bytes) or self.capacity_bytes, 0
        self._effective = self._effective_limit(self._limit)
        self._write(self._effective)
        return self.state()

    def _write(self, effective_bytes: int) -> None:
        self.segment.write_limit(effective_bytes // self.tp_size or self.zero_limit_bytes)

    def _effective_limit(self, limit_bytes: int) -> int:
        bundles = max(0, limit_bytes) // self.bundle_bytes
        if self.capacity_bytes:
            bundles = min(bundles, self.capacity_bytes // self.bundle_bytes)
        return bundles * self.bundle_bytes

    def set(self, limit_bytes: int, revision: int | None = None) -> MemoryLimitState:
        if limit_bytes < 0:
            raise InvalidRequestError(f"the memory limit must be non-negative, got {limit_bytes}")
        if revision is not None and revision < 0:
            raise InvalidRequestError(f"the revision must be non-negative, got {revision}")
        if not self._attached:
            raise KvcachedSegmentError("the kvcached segment is not attached yet")
        rev = self._revision + 1 if revision is None else int(revision)
        if rev < self._revision:
            return self.state("stale")
        if rev == self._revision:
            return self.state(None if limit_bytes == self._limit else "conflict")
        effective = self._effective_limit(int(limit_bytes))
        self._write(effective)
        self._limit, self._effective, self._revision = int(limit_bytes), effective, rev
        state = self.state()
        log.info(
            "kvcached %s: limit %.1f MB (revision %d): %s", self.segment.ipc_name, limit_bytes / 1e6, rev, state.status
        )
        return state

    def usage(self) -> KvcachedUsage | None:
        """Usage over all ranks."""
        usage = self.segment.read()
        if usage is None:
            return None
        return KvcachedUsage(
            usage.limit_bytes * self.tp_size, usage.used_bytes * self.tp_size, usage.prealloc_bytes * self.tp_size
        )

    def state(self, status: str | None = None, usage: KvcachedUsage | None = None) -> MemoryLimitState:
        usage = usage or self.usage()
        used = usage.used_bytes if usage else 0
        mapped = usage.mapped_bytes if usage else 0
        if status is None:
            # kvcached shrinks once the pages in use fit; spare pre-mapped pages go with the shrink.
            status = "deferred" if used > self._effective else "applied"
        return MemoryLimitState(status, self._limit, self._effective, mapped, self._revision)
