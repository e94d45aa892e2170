"""Pinned host copies of a model's weights, kept for the engine's life.

Weights never change while serving, so the host copy is always current:
deactivating only swaps the device tensors for their host copies (instant,
then the device memory is returned), and activating copies from pinned
memory at full bus speed. Pinning happens once, at load, where the time it
takes (about 1 s per GB on our GPU hosts) is not on a model switch's path."""

from __future__ import annotations

import torch
from torch import nn


class HostWeights:
    def __init__(self, model: nn.Module):
        # parameters() yields a tied weight once, so it is copied once.
        self._tensors = [*model.parameters(), *model.buffers()]
        with torch.no_grad():
            self._host = [torch.empty_like(t.data, device="cpu").pin_memory().copy_(t.data) for t in self._tensors]

    @property
    def nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self._host)

    def to_device(self, device: torch.device) -> None:
        with torch.no_grad():
            for t, host in zip(self._tensors, self._host):
                t.data = host.to(device, non_blocking=True)
        torch.cuda.synchronize(device)

    def to_host(self) -> None:
        for t, host in zip(self._tensors, self._host):
            t.data = host
        torch.cuda.empty_cache()
