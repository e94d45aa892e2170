"""PagePool: the CPU KV pool with kvcached's semantics (pages mapped on
allocation and unmapped when empty, a revisioned limit on mapped bytes,
deferred shrinks), and its host memory really going back to the kernel."""

from __future__ import annotations

import ctypes
import mmap
import sys

import pytest
import torch

from services.gpu_agent.engine.kv_pool import KVGeometry, PagePool

# 2 layers x 2 kv heads x 16 dims x 4 bytes = 128 bytes a slot in each buffer.
GEOMETRY = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32)
PAGE = 1024  # bytes of each buffer a page: 8 slots
BUNDLE = 8 * GEOMETRY.token_bytes  # a page over 2 layers' K and V: 4 KiB


def pool(capacity_tokens: int = 64, limit_bytes: int = 1 << 30) -> PagePool:
    return PagePool(GEOMETRY, capacity_tokens, limit_bytes, "cpu", page_bytes=PAGE)


def test_geometry_and_pages():
    p = pool(capacity_tokens=60)
    assert GEOMETRY.token_bytes == 512 and p.tokens_per_page == 8 and p.bundle_bytes == BUNDLE
    assert p.capacity_tokens == 64  # rounded up to whole pages
    assert p.k_buffers[0].shape == (64, 2, 16) and len(p.v_buffers) == 2
    assert p.k_buffers[0].data_ptr() % mmap.PAGESIZE == 0


def test_pages_are_mapped_on_alloc_and_unmapped_when_empty():
    p = pool()
    a = p.alloc(3)
    assert len(a) == 3 and len(set(a)) == 3
    assert p.used_tokens == 3 and p.mapped_bytes == BUNDLE
    b = p.alloc(6)  # 5 more fit in the first page, then a second page
    assert p.mapped_bytes == 2 * BUNDLE and p.used_bytes == 9 * GEOMETRY.token_bytes
    assert not set(a) & set(b)
    p.free(a)
    assert p.mapped_bytes == 2 * BUNDLE  # page 0 still holds some of b
    p.free(b)
    assert p.used_tokens == 0 and p.mapped_bytes == 0
    with pytest.raises(ValueError):
        p.free([b[0]])  # a double free is a bug, not something to ignore


def test_alloc_fails_whole_at_the_limit_or_the_reservation():
    p = pool(capacity_tokens=32, limit_bytes=2 * BUNDLE + BUNDLE // 2)  # effective: 2 pages
    assert p.limit_state().effective_limit_bytes == 2 * BUNDLE and p.limit_tokens == 16
    assert p.free_tokens == 16
    got = p.alloc(10)
    assert p.alloc(7) is None and p.used_tokens == 10  # nothing taken by the failed call
    assert p.free_tokens == 6 and len(p.alloc(6)) == 6
    p.set_memory_limit(1 << 30, revision=1)
    assert p.limit_state().effective_limit_bytes == 4 * BUNDLE  # capped at the reservation
    assert p.alloc(17) is None and len(p.alloc(16)) == 16
    assert p.free_tokens == 0
    p.free(got)


def test_limit_revisions():
    p = pool()
    assert p.set_memory_limit(BUNDLE, revision=3).status == "applied"
    stale = p.set_memory_limit(8 * BUNDLE, revision=2)
    assert stale.status == "stale" and stale.limit_bytes == BUNDLE and stale.revision == 3
    assert p.set_memory_limit(BUNDLE, revision=3).status == "applied"  # the same again: no change
    assert p.set_memory_limit(2 * BUNDLE, revision=3).status == "conflict"
    assert p.limit_state().limit_bytes == BUNDLE
    with pytest.raises(ValueError):
        p.set_memory_limit(-1, revision=4)


def test_shrink_below_mapped_is_deferred_until_frees():
    p = pool()
    a, b = p.alloc(8), p.alloc(8)  # two full pages
    state = p.set_memory_limit(BUNDLE, revision=1)
    assert state.status == "deferred" and state.mapped_bytes == 2 * BUNDLE and p.over_limit
    assert p.alloc(1) is None and p.free_tokens == 0  # no new page while over
    p.free(b)
    assert not p.over_limit and p.limit_state().status == "applied"
    p.free(a)


def test_allocation_prefers_low_pages():
    p = pool()
    first = p.alloc(8)
    second = p.alloc(8)
    p.free(first)
    again = p.alloc(4)
    assert max(again) < 8 and min(second) >= 8  # page 0 is reused before page 2 is mapped


def _resident_bytes(buffers: list[torch.Tensor]) -> int:
    """The bytes of the buffers' OS pages that are in memory (mincore): the buffers' own residency,
    not the process's, which memory freed by earlier tests and kept by the allocator would blur."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    total = 0
    for buf in buffers:
        start = buf.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
        end = buf.data_ptr() + buf.numel() * buf.element_size()
        pages = -(-(end - start) // mmap.PAGESIZE)
        vec = (ctypes.c_ubyte * pages)()
        assert libc.mincore(start, end - start, vec) == 0, ctypes.get_errno()
        total += sum(v & 1 for v in vec) * mmap.PAGESIZE
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and uses madvise")
def test_unmapped_pages_give_host_memory_back():
    geometry = KVGeometry(num_layers=4, num_kv_heads=8, head_dim=128, dtype=torch.float32)  # 4 KiB a slot a buffer
    page_bytes = 256 * 1024
    capacity = 16 * 1024  # 64 MiB a buffer, 512 MiB over the 8 buffers
    p = PagePool(geometry, capacity, 1 << 40, "cpu", page_bytes=page_bytes)
    buffers = [*p.k_buffers, *p.v_buffers]
    slots = p.alloc(capacity)
    index = torch.tensor(slots)
    for buf in buffers:
        buf[index] = 1.0  # touch every page
    touched = _resident_bytes(buffers)
    assert touched > 500 * 2**20, touched
    p.free(slots[: capacity // 2])
    half = _resident_bytes(buffers)
    assert half < 0.6 * touched, (half, touched)
    p.free(slots[capacity // 2 :])
    assert _resident_bytes(buffers) < 0.1 * touched
    assert p.k_buffers[0][0].abs().sum() == 0  # an unmapped page reads zero when used again


def test_held_bytes_are_the_pages_the_slots_are_spread_over():
    p = pool()
    first, second = p.alloc(6), p.alloc(6)  # the second takes the first page's last 2 slots and 4 of a new one
    assert p.held_bytes == 2 * BUNDLE
    p.free(first)  # 6 slots in use, packed they would fill one page; they are on two
    assert p.used_bytes == 6 * GEOMETRY.token_bytes and p.held_bytes == 2 * BUNDLE
    p.free(second)
    assert p.held_bytes == 0


def test_a_padding_slot_is_a_row_outside_the_pages_never_handed_out():
    """What a CUDA graph's padded rows write (cuda_graphs.py): the page pool's extra row."""
    plain = pool()
    assert plain.padding_slot is None
    geometry = KVGeometry(num_layers=2, num_kv_heads=2, head_dim=4, dtype=torch.float32)
    padded = PagePool(geometry, 64, 1 << 30, "cpu", page_bytes=4096, padding_slot=True)
    assert padded.padding_slot == padded.capacity_tokens
    assert all(b.shape[0] == padded.capacity_tokens + 1 for b in (*padded.k_buffers, *padded.v_buffers))
    slots = padded.alloc(padded.capacity_tokens)  # every slot there is: the padding row is not one of them
    assert slots is not None and padded.padding_slot not in slots and padded.alloc(1) is None
    assert padded.held_bytes == padded.num_pages * padded.bundle_bytes  # the row is outside the accounting


def test_a_kvcached_pool_is_refused_where_kvcached_could_never_map_its_first_page():
    """kvcached waits without end for the first page of a pool on a card too full for it (its headroom
    counted): the pool refuses at once instead, with what is short."""
    from services.gpu_agent.engine.kvcached_pool import pool_shortfall_bytes

    gib, page = 1 << 30, 64 << 20  # a first page of 2 MiB in each of 16 layers' K and V
    total = 80 * gib
    # The H100 probe's case: 3 GiB free, kvcached's default headroom of 5% (4 GiB): 1 GiB and the page short.
    assert pool_shortfall_bytes(3 * gib, total, page, 0.95) == gib + page
    assert pool_shortfall_bytes(3 * gib, total, page, 1.0) == 0  # the agent's setting: the page fits
    assert pool_shortfall_bytes(page - 1, total, page, 1.0) == 1
    assert pool_shortfall_bytes(page, total, page, 1.2) == 0  # above 1: no headroom, not a negative one
