"""What a host offers an agent, checked before it serves: Python, the torch
build, the GPUs and their driver, kvcached (importable, and on a GPU able to
map and free a page), SGLang against the releases the driver was verified
with, /dev/shm against the models' weights, pinned host-to-device bandwidth.

Each check gives one line: ok, warn (serves, but slower or with less than
it could: what to do is said), fail (blocks serving on the device asked
for) or skip (not relevant here). `prism doctor` prints them with the
cluster's own checks (prism/doctor.py); the agent logs them at start.

The verdicts are pure functions of what was found (facts in, Check out), so
each is tested with made-up facts; `gather_facts` alone looks at the host."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
# SGLang releases the driver (services/gpu_agent/sglang) was run against on a GPU, newest last.
SGLANG_VERIFIED = ("0.5.17",)
MIN_PYTHON = (3, 11)
# Below this, activating an 8B's 16 GB of weights from host memory takes over 1.6 s (an H100 gives ~50).
MIN_PINNED_GBPS = 10.0


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail | skip
    detail: str
    fix: str = ""  # what to do, for warn and fail

    def line(self) -> str:
        fix = f" -> {self.fix}" if self.fix and self.status in (WARN, FAIL) else ""
        return f"{self.status.upper():5} {self.name:10} {self.detail}{fix}"


@dataclass
class HostFacts:
    """What gather_facts found; every field has a value on any host."""

    python: tuple[int, int, int] = (0, 0, 0)
    torch_version: str = ""  # "" when torch does not import
    torch_error: str = ""
    torch_cuda: str = ""  # the CUDA version torch was built for; "" for a CPU build
    gpus: list[tuple[str, int]] = field(default_factory=list)  # (name, memory bytes) as torch sees them
    nvidia_smi_gpus: int = 0  # GPUs nvidia-smi lists (0 without nvidia-smi)
    driver: str = ""  # the NVIDIA driver's version, from nvidia-smi
    kvcached_version: str = ""  # "" when it does not import
    kvcached_error: str = ""
    kvcached_map: str = ""  # "" not tried; "ok" or why mapping a page failed
    sglang_version: str = ""  # "" when not installed
    shm_free_bytes: int | None = None  # None: no /dev/shm
    pinned_gbps: float | None = None  # None: not measured


def python_check(facts: HostFacts) -> Check:
    version = ".".join(map(str, facts.python))
    if facts.python[:2] < MIN_PYTHON:
        return Check(
            "python",
            FAIL,
            f"{version} ({sys.executable})",
            f"Prism needs Python {'.'.join(map(str, MIN_PYTHON))} or newer",
        )
    return Check("python", OK, f"{version} ({sys.executable})")


def torch_check(facts: HostFacts, device: str) -> Check:
    if not facts.torch_version:
        return Check(
            "torch", FAIL, f"does not import: {facts.torch_error}", "pip install torch (a CUDA build on a GPU host)"
        )
    build = f"CUDA {facts.torch_cuda} build" if facts.torch_cuda else "CPU build"
    detail = f"{facts.torch_version} ({build})"
    if not facts.torch_cuda and (facts.nvidia_smi_gpus or device == "cuda"):
        return Check(
            "torch",
            FAIL if device == "cuda" else WARN,
            detail + f"; this host has {facts.nvidia_smi_gpus} NVIDIA GPU(s)",
            "install a CUDA build of torch (pip install torch --index-url "
            "https://download.pytorch.org/whl/cu130, or your CUDA's)",
        )
    return Check("torch", OK, detail)


def gpu_check(facts: HostFacts, device: str) -> Check:
    if facts.gpus:
        names = ", ".join(f"{name} ({memory / 2**30:.0f} GiB)" for name, memory in facts.gpus)
        driver = f"; driver {facts.driver}" if facts.driver else ""
        return Check("gpus", OK, f"{len(facts.gpus)}: {names}{driver}")
    if device == "cuda":
        why = (
            f"nvidia-smi lists {facts.nvidia_smi_gpus} but torch sees none"
            if facts.nvidia_smi_gpus
            else "no NVIDIA GPU or driver found"
        )
        return Check("gpus", FAIL, why, "check the driver (nvidia-smi) and the torch build, or use --device cpu")
    return Check("gpus", SKIP, "no CUDA GPU: models are served on the CPU")


def kvcached_check(facts: HostFacts) -> Check:
    if not facts.gpus:
        return Check("kvcached", SKIP, "not needed on the CPU (the page pool has the same semantics)")
    if not facts.kvcached_version:
        return Check(
            "kvcached",
            WARN,
            f"does not import ({facts.kvcached_error}): engines run without ballooning, on the page pool",
            "pip install kvcached --no-build-isolation (it builds against this torch)",
        )
    if facts.kvcached_map and facts.kvcached_map != "ok":
        return Check(
            "kvcached",
            WARN,
            f"{facts.kvcached_version} imports but could not map a page: {facts.kvcached_map}",
            "rebuild kvcached against this torch and driver",
        )
    mapped = ", mapped and freed a page" if facts.kvcached_map == "ok" else ""
    return Check("kvcached", OK, f"{facts.kvcached_version}{mapped}")


def sglang_check(facts: HostFacts) -> Check:
    if not facts.sglang_version:
        return Check("sglang", SKIP, "not installed: models run on the built-in engine")
    if facts.sglang_version not in SGLANG_VERIFIED:
        return Check(
            "sglang",
            WARN,
            f"{facts.sglang_version}, not a release the driver was verified with ({', '.join(SGLANG_VERIFIED)})",
            f"pip install sglang=={SGLANG_VERIFIED[-1]}, or set engine: torch for the models",
        )
    return Check("sglang", OK, f"{facts.sglang_version} (verified)")


def shm_check(facts: HostFacts, weight_bytes: int) -> Check:
    """Engines of one model share its weights through /dev/shm (shared_weights.py)."""
    if facts.shm_free_bytes is None:
        return Check("/dev/shm", SKIP, "none here: each engine keeps its own copy of its weights")
    free = f"{facts.shm_free_bytes / 2**30:.1f} GiB free"
    if weight_bytes and facts.shm_free_bytes < weight_bytes:
        return Check(
            "/dev/shm",
            WARN,
            f"{free}, the models' weights are {weight_bytes / 2**30:.1f} GiB: those "
            "that do not fit are kept once per engine",
            "enlarge it (docker: --shm-size; mount -o remount,size=...)",
        )
    return Check("/dev/shm", OK, free + (f" for {weight_bytes / 2**30:.1f} GiB of weights" if weight_bytes else ""))


def bandwidth_check(facts: HostFacts) -> Check:
    if facts.pinned_gbps is None:
        return Check("pinned", SKIP, "host-to-device bandwidth not measured (no GPU)")
    if facts.pinned_gbps < MIN_PINNED_GBPS:
        return Check(
            "pinned",
            WARN,
            f"host-to-device {facts.pinned_gbps:.1f} GB/s: switching models on from host memory will be slow",
            "check the GPU's PCIe link (nvidia-smi -q | grep -i width)",
        )
    return Check("pinned", OK, f"host-to-device {facts.pinned_gbps:.1f} GB/s")


def verdicts(facts: HostFacts, device: str = "auto", weight_bytes: int = 0) -> list[Check]:
    """Every host check's line, for `device` ("auto", "cpu" or "cuda")."""
    if device == "cpu":  # the GPUs do not matter to a CPU agent: judged as if it had none
        facts = HostFacts(
            python=facts.python,
            torch_version=facts.torch_version,
            torch_error=facts.torch_error,
            torch_cuda=facts.torch_cuda,
            sglang_version=facts.sglang_version,
            shm_free_bytes=facts.shm_free_bytes,
        )
    return [
        python_check(facts),
        torch_check(facts, device),
        gpu_check(facts, device),
        kvcached_check(facts),
        sglang_check(facts),
        shm_check(facts, weight_bytes),
        bandwidth_check(facts),
    ]


# ---- looking at the host -------------------------------------------------------------------


def gather_facts(*, measure: bool = True) -> HostFacts:
    """What this host has. measure: also import kvcached, map a page with it and time a pinned copy on
    GPU 0 (about a second; the agent, whose engines own the GPU, does none of that: it reads kvcached's
    installed version instead)."""
    version = sys.version_info
    facts = HostFacts(python=(version.major, version.minor, version.micro))
    facts.nvidia_smi_gpus, facts.driver = _nvidia_smi()
    try:
        import torch
    except Exception as exc:  # noqa: BLE001  an ImportError, or a broken build
        facts.torch_error = f"{type(exc).__name__}: {exc}"
        return facts
    facts.torch_version = torch.__version__
    facts.torch_cuda = torch.version.cuda or ""
    if torch.cuda.is_available():
        facts.gpus = [
            (torch.cuda.get_device_name(i), torch.cuda.get_device_properties(i).total_memory)
            for i in range(torch.cuda.device_count())
        ]
    if measure:
        try:
            import kvcached

            facts.kvcached_version = getattr(kvcached, "__version__", "?")
        except Exception as exc:  # noqa: BLE001
            facts.kvcached_error = f"{type(exc).__name__}: {exc}"
    else:  # not imported into an agent whose engines import it in their own way (LD_PRELOAD, per process)
        facts.kvcached_version = installed_version("kvcached")
        facts.kvcached_error = "" if facts.kvcached_version else "not installed"
    facts.sglang_version = installed_version("sglang")
    facts.shm_free_bytes = _free_bytes("/dev/shm")
    if measure and facts.gpus:
        facts.kvcached_map = _map_a_page() if facts.kvcached_version else ""
        facts.pinned_gbps = pinned_bandwidth() / 1e9
    return facts


def _nvidia_smi() -> tuple[int, str]:
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return 0, ""
    try:
        out = subprocess.run(
            [binary, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return 0, ""
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []
    return len(lines), lines[0] if lines else ""


def installed_version(package: str) -> str:
    """An installed distribution's version; "" when it is not installed (nothing imported)."""
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return ""


def _free_bytes(path: str) -> int | None:
    if platform.system() != "Linux" or not os.path.isdir(path):
        return None
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def _map_a_page() -> str:
    """Maps one page of a one-layer KV cache through kvcached on GPU 0 and frees it: "ok", or why not."""
    try:
        import torch

        from services.gpu_agent.engine.kv_pool import KVGeometry
        from services.gpu_agent.engine.kvcached_pool import KvcachedPool

        geometry = KVGeometry(num_layers=1, num_kv_heads=1, head_dim=128, dtype=torch.bfloat16)
        pool = KvcachedPool(geometry, capacity_tokens=1 << 16, limit_bytes=64 << 20, device="cuda:0")
        try:
            slots = pool.alloc(1)
            if not slots:
                return "no slot was given under a 64 MiB limit"
            pool.free(slots)
        finally:
            pool.close()
    except Exception as exc:  # noqa: BLE001  said, not raised: it is what the check reports
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def pinned_bandwidth(nbytes: int = 256 << 20, repeats: int = 3) -> float:
    """Best-of-N bytes/s of one pinned host -> GPU 0 copy of nbytes."""
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        device.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    del host, device
    torch.cuda.empty_cache()
    return nbytes / best
