"""A model's weights in one pinned host buffer, kept for the engine's life.

Weights never change while serving, so the host copy is always current:
deactivating only points the parameters back at their host copies (instant)
and returns the device buffer; activating allocates one device buffer, copies
the host buffer into it in a few large chunks on parallel CUDA streams (at the
bus's pinned bandwidth: one allocation and a handful of copies instead of one
per tensor), then points every parameter at its slice. Pinning happens once,
at load, where its cost (about 1 s per GB) is off a model switch's path.

With shared=True the host buffer is in shared memory (then registered with
CUDA as pinned), so another process on the host can map the same weights
instead of holding a second copy."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

_ALIGN = 256  # bytes: every tensor starts aligned for any dtype and for fast copies
DEFAULT_COPY_STREAMS = 4


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
    def __init__(self, model: nn.Module, shared: bool = False):
        # parameters() yields a tied weight once, so it is stored once.
        self._tensors = [*model.parameters(), *model.buffers()]
        self._offsets: list[int] = []
        total = 0
        for t in self._tensors:
            self._offsets.append(total)
            total += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
        self.nbytes = total
        self.shared = shared
        self._host = self._allocate_host(total, shared)
        self._registered = shared and torch.cuda.is_available()
        self._host_views = [self._view(self._host, i) for i in range(len(self._tensors))]
        with torch.no_grad():
            for t, view in zip(self._tensors, self._host_views):
                view.copy_(t.data)
        self._device_buffer: torch.Tensor | None = None

    @staticmethod
    def _allocate_host(nbytes: int, shared: bool) -> torch.Tensor:
        if not shared:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=torch.cuda.is_available())
        host = torch.empty(nbytes, dtype=torch.uint8).share_memory_()
        if torch.cuda.is_available():
            err = torch.cuda.cudart().cudaHostRegister(host.data_ptr(), nbytes, 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed with CUDA error {int(err)}")
        return host

    def _view(self, buffer: torch.Tensor, i: int) -> torch.Tensor:
        t = self._tensors[i]
        n = t.numel() * t.element_size()
        return buffer[self._offsets[i]:self._offsets[i] + n].view(t.dtype).view(t.shape)

    @property
    def host_buffer(self) -> torch.Tensor:
        """The whole packed host copy (for handing to another process when shared)."""
        return self._host

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
        """Unregisters shared pinned memory (plain pinned memory is freed by torch)."""
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self._host.data_ptr())
            self._registered = False
