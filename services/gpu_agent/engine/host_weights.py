"""A model's weights in one pinned host buffer, kept for the engine's life.

Weights never change while serving, so the host copy is always current:
deactivating only points the parameters back at their host copies (instant)
and returns the device buffer; activating allocates one device buffer, copies
the host buffer into it in a few large chunks on parallel CUDA streams (at the
bus's pinned bandwidth: one allocation and a handful of copies instead of one
per tensor), then points every parameter at its slice. Pinning happens once,
at load, where its cost (about 1 s per GB) is off a model switch's path.

Given a SharedWeightsFile, the host buffer is that named shared-memory file
(registered with CUDA as pinned), so another process on the host attaches
to the same weights (HostWeights.attach) instead of loading the model and
holding a second copy."""

from __future__ import annotations

import logging
import mmap
import time
from dataclasses import dataclass

import torch
from torch import nn

from services.gpu_agent.engine.shared_weights import SharedWeightsFile, layout_digest

log = logging.getLogger(__name__)

_ALIGN = 256  # bytes: every tensor starts aligned for any dtype and for fast copies
_CUDA_HOST_REGISTER_PORTABLE = 1  # pinned for every CUDA context of the process
DEFAULT_COPY_STREAMS = 4


def _page_aligned_bytes(nbytes: int) -> torch.Tensor:
    """Plain host memory starting on an OS page, as cudaHostRegister pins whole pages."""
    raw = torch.empty(nbytes + mmap.PAGESIZE, dtype=torch.uint8)
    skip = -raw.data_ptr() % mmap.PAGESIZE
    return raw[skip : skip + nbytes]


@dataclass(frozen=True)
class ActivationTiming:
    """Where an activation's time went."""

    nbytes: int
    allocate_s: float  # the device buffer
    copy_s: float  # host -> device
    ready_s: float  # parameters pointed at the device copy, KV pool ready

    @property
    def total_s(self) -> float:
        return self.allocate_s + self.copy_s + self.ready_s

    @property
    def copy_gbps(self) -> float:
        return self.nbytes / self.copy_s / 1e9 if self.copy_s > 0 else float("inf")

    def with_ready(self, extra_s: float) -> ActivationTiming:
        return ActivationTiming(self.nbytes, self.allocate_s, self.copy_s, self.ready_s + extra_s)


class HostWeights:
    def __init__(self, model: nn.Module, shared_file: SharedWeightsFile | None = None, pin: bool = True):
        """Packs the model's weights into a new host buffer: the shared file when
        one is given and can be created (none exists yet, there is room), a
        private one otherwise. pin: for copies to a GPU (where CUDA runs)."""
        self._layout(model)
        self._pin = pin and torch.cuda.is_available()
        host = shared_file.create(self.nbytes) if shared_file is not None else None
        self.shared = host is not None
        # A private buffer is pinned by registering plain memory, not through torch's pinned
        # allocator, which rounds each allocation up to a power of two (a 70B config's 35 GB
        # shard would pin 64 GiB).
        self._host = host if host is not None else _page_aligned_bytes(self.nbytes)
        self._registered = self._pin and self._register(self._host)
        self._host_views = [self._view(self._host, i) for i in range(len(self._tensors))]
        with torch.no_grad():
            for t, view in zip(self._tensors, self._host_views):
                view.copy_(t.data)
        if host is not None and shared_file is not None:  # the shared copy is whole: others may map it
            shared_file.mark_complete(self.digest, self.nbytes)
        self._device_buffer: torch.Tensor | None = None

    @classmethod
    def attach(cls, skeleton: nn.Module, shared_file: SharedWeightsFile, pin: bool = True) -> HostWeights | None:
        """Points the skeleton's tensors (a model of the same config, its values
        unset) at a complete shared copy of its weights; None if there is none."""
        self = cls.__new__(cls)
        self._layout(skeleton)
        host = shared_file.open_complete(self.digest, self.nbytes)
        if host is None:
            return None
        self.shared = True
        self._pin = pin and torch.cuda.is_available()
        self._host = host
        self._registered = self._pin and self._register(host)
        self._host_views = [self._view(host, i) for i in range(len(self._tensors))]
        self._device_buffer = None
        self.to_host()
        return self

    def _layout(self, model: nn.Module) -> None:
        # parameters() yields a tied weight once, so it is stored once.
        self._tensors = [*model.parameters(), *model.buffers()]
        self._offsets: list[int] = []
        total = 0
        for t in self._tensors:
            self._offsets.append(total)
            total += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        self.nbytes = total
        self.digest = layout_digest(self._tensors, self._offsets, total)

    @staticmethod
    def _register(host: torch.Tensor) -> bool:
        """Pins a host buffer (a mapped shared file or private memory) for CUDA's copy engines."""
        start = time.perf_counter()
        err = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), host.numel(), _CUDA_HOST_REGISTER_PORTABLE)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister of {host.numel()} bytes failed with CUDA error {int(err)}")
        log.info("pinned %d MB of host weights in %.2fs", host.numel() >> 20, time.perf_counter() - start)
        return True

    def _view(self, buffer: torch.Tensor, i: int) -> torch.Tensor:
        t = self._tensors[i]
        n = t.numel() * t.element_size()
        return buffer[self._offsets[i] : self._offsets[i] + n].view(t.dtype).view(t.shape)

    def to_device(self, device: torch.device, streams: int = DEFAULT_COPY_STREAMS) -> ActivationTiming:
        start = time.perf_counter()
        buffer = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
        torch.cuda.synchronize(device)
        allocated = time.perf_counter()
        # A few large chunks on separate streams keep the copy engines busy back to back.
        chunk = -(-self.nbytes // streams // _ALIGN) * _ALIGN
        side_streams = [torch.cuda.Stream(device) for _ in range(streams)]
        for i, stream in enumerate(side_streams):
            lo, hi = i * chunk, min(self.nbytes, (i + 1) * chunk)
            if lo < hi:
                with torch.cuda.stream(stream):
                    buffer[lo:hi].copy_(self._host[lo:hi], non_blocking=True)
        for stream in side_streams:
            stream.synchronize()
        copied = time.perf_counter()
        with torch.no_grad():
            for i, t in enumerate(self._tensors):
                t.data = self._view(buffer, i)
        self._device_buffer = buffer
        return ActivationTiming(self.nbytes, allocated - start, copied - allocated, time.perf_counter() - copied)

    def to_host(self) -> None:
        for t, view in zip(self._tensors, self._host_views):
            t.data = view
        self._device_buffer = None
        torch.cuda.empty_cache()

    def close(self) -> None:
        """Unpins the buffer (torch frees private memory, and a shared mapping ends, with the tensor)."""
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self._host.data_ptr())
            self._registered = False
