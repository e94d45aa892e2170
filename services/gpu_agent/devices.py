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


def discover_devices(kind: str = "auto", cpu_memory_gb: float = 4.0, cpu_devices: int = 1) -> list[Device]:
    """kind: "auto" (CUDA if present, else CPU), "cuda" (error if absent) or "cpu".
    cpu_devices: on the CPU, this many devices (ids 0..n-1), each with its own
    memory budget and all on the same cores, so that placements over several
    GPUs (tensor parallelism: tp_size > 1) run on a machine without any."""
    if kind not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device kind must be auto, cuda or cpu, got {kind!r}")
    if kind in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            return [
                Device(i, "cuda", torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory)
                for i in range(torch.cuda.device_count())
            ]
        if kind == "cuda":
            raise RuntimeError("--device cuda was asked for but torch sees no CUDA GPU")
    if cpu_memory_gb <= 0:
        raise ValueError(f"cpu memory budget must be positive, got {cpu_memory_gb} GB")
    if cpu_devices < 1:
        raise ValueError(f"cpu devices must be at least 1, got {cpu_devices}")
    return [Device(i, "cpu", f"cpu ({os.cpu_count()} cores)", int(cpu_memory_gb * GB)) for i in range(cpu_devices)]
