"""Device initialization a worker does before any model is known, so that
loading a model into a warm worker pays for none of it: torch's lazy
start-up on the engine's paths (building a module on the meta device first
imports torch._dynamo: over a second), and on CUDA the context, cuBLAS
handles and kernels (a matmul per dtype), kvcached's init and a compile of
the Triton decode kernel.

Every step is guarded: a missing package (kvcached, triton) or a failing
step is logged and skipped, never fatal, since the engine itself decides
later whether to use them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)

# A Llama-3.2-1B-like decode geometry: 32 query heads over 8 kv heads of 64.
# The kernel is compiled per (group size, head dim, dtype); the rest of a
# model's geometry only changes launch sizes.
_WARMUP_HEADS, _WARMUP_KV_HEADS, _WARMUP_HEAD_DIM = 32, 8, 64
_WARMUP_DTYPES = (torch.bfloat16, torch.float16)


@dataclass
class WarmupReport:
    device: str
    seconds: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)  # step -> seconds (only the ones that ran)
    skipped: dict[str, str] = field(default_factory=dict)  # step -> why


def warm_up(device: str) -> WarmupReport:
    report = WarmupReport(device)
    start = time.perf_counter()
    dev = torch.device(device)
    _step(report, "torch_lazy_init", lambda: _module_on_meta(dev))
    if dev.type == "cuda":
        _step(report, "cuda_context", lambda: _cuda_context(dev))
        _step(report, "cublas", lambda: _matmuls(dev, (torch.bfloat16, torch.float16, torch.float32)))
        _step(report, "kvcached", lambda: _kvcached(dev))
        _step(report, "triton_decode", lambda: _triton_decode(dev))
    else:
        _step(report, "cpu_matmul", lambda: _matmuls(dev, (torch.float32,)))
    report.seconds = time.perf_counter() - start
    log.info(
        "device %s warm in %.2fs (%s)%s",
        device,
        report.seconds,
        ", ".join(f"{k} {v:.2f}s" for k, v in report.steps.items()),
        "".join(f"; skipped {k}: {v}" for k, v in report.skipped.items()),
    )
    return report


def _step(report: WarmupReport, name: str, run) -> None:
    start = time.perf_counter()
    try:
        outcome = run()
    except Exception as exc:  # noqa: BLE001  a warm-up step is an optimization, never a reason to fail
        report.skipped[name] = f"{type(exc).__name__}: {exc}"
        return
    if isinstance(outcome, str):  # a step that did not apply says why
        report.skipped[name] = outcome
    else:
        report.steps[name] = time.perf_counter() - start


def _module_on_meta(dev: torch.device) -> None:
    # What the engine's weights.build_empty_model does, at toy size.
    with torch.device("meta"):
        module = torch.nn.Sequential(torch.nn.Embedding(8, 8), torch.nn.Linear(8, 8))
    module.to_empty(device="cpu")


def _cuda_context(dev: torch.device) -> None:
    torch.cuda.set_device(dev)
    torch.cuda.init()
    torch.empty(1, device=dev).fill_(0)
    torch.cuda.synchronize(dev)


def _matmuls(dev: torch.device, dtypes) -> None:
    for dtype in dtypes:
        a = torch.randn(256, 256, device=dev).to(dtype)
        (a @ a).sum().item()
        torch.nn.functional.linear(a[:3], a).sum().item()  # the decode shape: a few rows through a weight


def _kvcached(dev: torch.device) -> str | None:
    try:
        from kvcached.integration.sglang import interfaces as kvi
    except Exception as exc:  # noqa: BLE001  not installed, or a broken native build
        return f"not importable ({type(exc).__name__})"
    kvi.init_kvcached(device=str(dev))  # idempotent: the engine's KvcachedPool calls it again
    return None


def _triton_decode(dev: torch.device) -> str | None:
    from services.gpu_agent.engine.triton_decode import (
        paged_decode_attention,
        triton_available,
    )

    if not triton_available():
        return "triton not available"
    batch, max_len = 2, 512
    slots = batch * max_len
    for dtype in _WARMUP_DTYPES:
        q = torch.randn(batch, _WARMUP_HEADS, _WARMUP_HEAD_DIM, device=dev, dtype=dtype)
        k = torch.randn(slots, _WARMUP_KV_HEADS, _WARMUP_HEAD_DIM, device=dev, dtype=dtype)
        v = torch.randn_like(k)
        table = torch.arange(slots, device=dev, dtype=torch.int32).view(batch, max_len)
        lens = torch.full((batch,), max_len, device=dev, dtype=torch.int32)
        for splits in (1, 4):  # one split writes directly; several add the combine kernel
            paged_decode_attention(q, k, v, table, lens, _WARMUP_HEAD_DIM**-0.5, num_splits=splits)
    torch.cuda.synchronize(dev)
    return None
