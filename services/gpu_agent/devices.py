"""Which devices this machine offers to engines.

CUDA GPUs are found through torch; a machine without one offers its CPU as
device 0 with a configured memory budget, so placement and memory logic run
unchanged on laptops and CI.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

GB = 1 << 30


@dataclass(frozen=True)
class Device:
    index: int
    kind: str  # "cuda" | "cpu"
    name: str
    memory_bytes: int

    @property
    def torch_device(self) -> str:
        return f"cuda:{self.index}" if self.kind == "cuda" else "cpu"


def discover_devices(
    kind: str = "auto", cpu_memory_gb: float = 4.0, cpu_devices: int = 1, gpu_memory_gb: float = 0.0
) -> list[Device]:
    """kind: "auto" (CUDA if present, else CPU), "cuda" (error if absent) or "cpu".
    cpu_devices: on the CPU, this many devices (ids 0..n-1), each with its own
    memory budget and all on the same cores, so that placements over several
    GPUs (tensor parallelism: tp_size > 1) run on a machine without any.
    gpu_memory_gb: each GPU counts as having at most this much memory (0: all of it), for a card
    shared with something else, or one that stands in for a smaller card (an H200 run as an 80 GB H100)."""
    if kind not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device kind must be auto, cuda or cpu, got {kind!r}")
    if gpu_memory_gb < 0:
        raise ValueError(f"gpu memory must be positive (or 0: the whole card), got {gpu_memory_gb} GB")
    if kind in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            return [
                Device(
                    i,
                    "cuda",
                    torch.cuda.get_device_name(i),
                    gpu_memory_bytes(torch.cuda.get_device_properties(i).total_memory, gpu_memory_gb),
                )
                for i in range(torch.cuda.device_count())
            ]
        if kind == "cuda":
            raise RuntimeError("--device cuda was asked for but torch sees no CUDA GPU")
    if cpu_memory_gb <= 0:
        raise ValueError(f"cpu memory budget must be positive, got {cpu_memory_gb} GB")
    if cpu_devices < 1:
        raise ValueError(f"cpu devices must be at least 1, got {cpu_devices}")
    return [Device(i, "cpu", f"cpu ({os.cpu_count()} cores)", int(cpu_memory_gb * GB)) for i in range(cpu_devices)]


def gpu_memory_bytes(total_bytes: int, cap_gb: float) -> int:
    """A GPU's memory as the agent plans with it: the card's, or cap_gb where that is less (0: no cap)."""
    return min(total_bytes, int(cap_gb * GB)) if cap_gb > 0 else total_bytes
