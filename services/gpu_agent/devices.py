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


def discover_devices(kind: str = "auto", cpu_memory_gb: float = 4.0) -> list[Device]:
    """kind: "auto" (CUDA if present, else CPU), "cuda" (error if absent) or "cpu"."""
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
    return [Device(0, "cpu", f"cpu ({os.cpu_count()} cores)", int(cpu_memory_gb * GB))]
