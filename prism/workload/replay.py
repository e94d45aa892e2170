"""Open-loop replay of a trace against a running cluster (`prism bench`).

Each request is sent at its trace time, whatever happened to the earlier
ones (open loop: a slow cluster does not slow the arrivals down), through
the OpenAI REST API (streaming completions) or the gRPC gateway. Per request
it records TTFT (sending to the first streamed token), TPOT (the time after
the first token over the tokens after it), end-to-end latency and any error.
A request attains its SLO when it succeeded and its TTFT and TPOT are within
the targets times `slo_scale`. Goodput is the rate of requests that attained.

Over the REST API a token that decodes to no text yet sends no chunk, so
TTFT there is the time to the first text (the same for real tokenizers; the
gRPC gateway's stream has one response per token, exact for dummy weights).
Prompts are synthetic text of the trace's prompt length at `chars_per_token`
(1 for the byte-level tokenizers of the project's tiny models and dummy
configs; about 4 for real BPE tokenizers); outputs have exactly the trace's
output length (ignore_eos)."""

from __future__ import annotations

import asyncio
import functools
import json
import random
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

from prism.progress import Progress, bar
from prism.workload.trace import Trace, TraceRequest

if TYPE_CHECKING:  # grpc loads only for a replay (the simulator imports this module too)
    from services.common.tls import TlsFiles

WORDS = (
    "the",
    "model",
    "serves",
    "many",
    "requests",
    "from",
    "users",
    "across",
    "a",
    "shared",
    "cluster",
    "of",
    "graphics",
    "cards",
    "while",
    "latency",
    "targets",
    "hold",
    "for",
    "each",
    "one",
)


@dataclass(frozen=True)
class SloTargets:
    ttft_s: float = 1.0
    tpot_s: float = 0.1
    scale: float = 1.0  # multiplies both targets
    # model -> (ttft_s, tpot_s) where a model has its own (a config's "slo"); the others take the two above
    per_model: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def with_models(self, models) -> SloTargets:
        """These targets with each model's own where its config sets one (ModelConfig's ttft_slo_ms and
        tpot_slo_ms; either alone keeps the default for the other)."""
        own = dict(self.per_model)
        for m in models:
            if m.ttft_slo_ms or m.tpot_slo_ms:
                own[m.model_name] = (
                    m.ttft_slo_ms / 1000 if m.ttft_slo_ms else self.ttft_s,
                    m.tpot_slo_ms / 1000 if m.tpot_slo_ms else self.tpot_s,
                )
        return replace(self, per_model=own)

    def of(self, model: str | None) -> tuple[float, float]:
        """The model's (ttft_s, tpot_s), before scaling."""
        return (
            self.per_model.get(model, (self.ttft_s, self.tpot_s)) if model is not None else (self.ttft_s, self.tpot_s)
        )

    def attained(self, ttft_s: float | None, tpot_s: float | None, model: str | None = None) -> bool:
        ttft_target, tpot_target = self.of(model)
        return (
            ttft_s is not None
            and ttft_s <= ttft_target * self.scale
            and (tpot_s is None or tpot_s <= tpot_target * self.scale)
        )


@dataclass
class RequestResult:
    index: int
    model: str
    sent_at: float  # seconds from the replay's start
    prompt_tokens: int
    output_tokens: int
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    tokens: int = 0  # streamed tokens (gRPC) or text chunks (REST)
    error: str | None = None
    attained: bool = False


def prompt_text(length_tokens: int, index: int, chars_per_token: float) -> str:
    rng = random.Random(index)
    target = max(1, round(length_tokens * chars_per_token))
    parts, size = [], 0
    while size < target:
        word = rng.choice(WORDS)
        parts.append(word)
        size += len(word) + 1
    return " ".join(parts)[:target]


async def _send_rest(client, req: TraceRequest, index: int, chars_per_token: float, result: RequestResult) -> None:
    import httpx

    body = {
        "model": req.model,
        "prompt": prompt_text(req.prompt_tokens, index, chars_per_token),
        "max_tokens": req.output_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    start = time.monotonic()
    first = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:200]}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "error event")
                    return
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    result.tokens += 1
                    if first is None:
                        first = time.monotonic()
    except httpx.HTTPError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return
    _finish(result, start, first, req.output_tokens)


async def _send_grpc(
    stub, req: TraceRequest, index: int, chars_per_token: float, result: RequestResult, metadata=None
) -> None:
    import grpc

    from prism_client.v1 import generate_pb2

    request = generate_pb2.GenerateRequest(
        model=req.model,
        prompt=prompt_text(req.prompt_tokens, index, chars_per_token),
        sampling=generate_pb2.SamplingParams(max_tokens=req.output_tokens, temperature=0, ignore_eos=True),
    )
    start = time.monotonic()
    first = None
    try:
        async for response in stub.Generate(request, timeout=3600, metadata=metadata):
            if response.token_ids:
                result.tokens += len(response.token_ids)
                if first is None:
                    first = time.monotonic()
    except grpc.aio.AioRpcError as exc:
        result.error = f"{exc.code().name}: {exc.details()}"
        return
    _finish(result, start, first, result.tokens)


def _finish(result: RequestResult, start: float, first: float | None, tokens: int) -> None:
    end = time.monotonic()
    result.e2e_s = end - start
    if first is not None:
        result.ttft_s = first - start
        result.tpot_s = (end - first) / (tokens - 1) if tokens > 1 else None


def progress_text(results: list[RequestResult], done: int, elapsed_s: float) -> str:
    """The replay's progress: requests ended, the share of them within SLO so far, errors."""
    within = sum(r.attained for r in results)  # False until a request has ended within its SLO
    errors = sum(r.error is not None for r in results)
    share = f"{100 * within / done:.1f}% within SLO" if done else "none ended yet"
    return f"{bar(done, len(results))} {done}/{len(results)} requests, {share}, {errors} errors, {elapsed_s:.0f}s"


async def replay(
    trace: Trace,
    *,
    http_url: str | None = None,
    grpc_address: str | None = None,
    slo: SloTargets = SloTargets(),
    chars_per_token: float = 1.0,
    progress: bool = False,
    tls: TlsFiles | None = None,
    api_key: str | None = None,
) -> list[RequestResult]:
    """Sends the trace to the REST API at http_url, or to the gRPC gateway
    at grpc_address; returns one result per request, in trace order. tls:
    the CA that verifies a TLS gateway (and a client certificate, if it wants one).
    api_key: for a gateway with API keys (default $PRISM_API_KEY)."""
    from prism_client import auth_metadata

    metadata = auth_metadata(api_key)
    if (http_url is None) == (grpc_address is None):
        raise ValueError("give either http_url or grpc_address")
    results = [RequestResult(i, r.model, r.t, r.prompt_tokens, r.output_tokens) for i, r in enumerate(trace.requests)]
    done = 0
    t0 = time.monotonic()

    shown = Progress() if progress else None

    async def one(send, client, index: int) -> None:
        nonlocal done
        result = results[index]
        await send(client, trace.requests[index], index, chars_per_token, result)
        result.attained = result.error is None and slo.attained(result.ttft_s, result.tpot_s, result.model)
        done += 1
        if shown is not None:
            shown.update(progress_text(results, done, time.monotonic() - t0))

    async def run(send, client) -> None:
        tasks = []
        for index, req in enumerate(trace.requests):
            delay = t0 + req.t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(send, client, index)))
        await asyncio.gather(*tasks)

    from services.common.tls import aio_channel, ssl_context

    if http_url is not None:
        import httpx

        limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
        async with httpx.AsyncClient(
            base_url=http_url,
            timeout=3600,
            limits=limits,
            headers=dict(metadata or ()),
            verify=True if tls is None else ssl_context(tls),
        ) as client:
            await run(_send_rest, client)
    else:
        from prism_client.v1 import gateway_pb2_grpc

        assert grpc_address is not None  # one of the two is given (checked at the top)
        async with aio_channel(grpc_address, tls) as channel:
            await run(functools.partial(_send_grpc, metadata=metadata), gateway_pb2_grpc.GatewayStub(channel))
    if shown is not None:
        shown.close(progress_text(results, done, time.monotonic() - t0))
    return results


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))]


def summarize(results: list[RequestResult], duration_s: float) -> dict:
    ok = [r for r in results if r.error is None]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]  # every request that ended without error has its own
    errors: dict[str, int] = {}
    for r in results:
        if r.error is not None:
            kind = r.error.split(":")[0]
            errors[kind] = errors.get(kind, 0) + 1
    attained = sum(r.attained for r in results)
    return {
        "requests": len(results),
        "succeeded": len(ok),
        "errors": errors,
        "slo_attainment": attained / len(results) if results else 1.0,
        "goodput_rps": attained / duration_s if duration_s > 0 else 0.0,
        "ttft_p50_s": _percentile(ttft, 0.5),
        "ttft_p99_s": _percentile(ttft, 0.99),
        "tpot_p50_s": _percentile(tpot, 0.5),
        "tpot_p99_s": _percentile(tpot, 0.99),
        "e2e_mean_s": statistics.mean(e2e) if e2e else None,
    }


def attainment_over_time(results: list[RequestResult], bucket_s: float) -> list[dict]:
    buckets: dict[int, list[RequestResult]] = {}
    for r in results:
        buckets.setdefault(int(r.sent_at // bucket_s), []).append(r)
    return [
        {"start_s": b * bucket_s, "requests": len(rs), "slo_attainment": sum(r.attained for r in rs) / len(rs)}
        for b, rs in sorted(buckets.items())
    ]


def report(trace: Trace, results: list[RequestResult], slo: SloTargets, api: str) -> dict:
    duration = max(trace.duration_s, 1e-9)
    return {
        "trace": trace.metadata,
        "api": api,
        "slo": asdict(slo),
        "overall": summarize(results, duration),
        "per_model": {m: summarize([r for r in results if r.model == m], duration) for m in trace.models},
        "over_time": attainment_over_time(results, max(1.0, duration / 20)),
        "requests": [asdict(r) for r in results],
    }


def plot(result: dict, path: str) -> None:
    """Latency CDFs and attainment over time (needs matplotlib: pip install '.[bench]')."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    requests = result["requests"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, key, title in ((axes[0], "ttft_s", "TTFT"), (axes[1], "e2e_s", "end-to-end latency")):
        values = sorted(r[key] for r in requests if r[key] is not None)
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))])
        ax.set_xlabel(f"{title} (s)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{title} CDF")
    over = result["over_time"]
    axes[2].plot([b["start_s"] for b in over], [100 * b["slo_attainment"] for b in over], marker="o")
    axes[2].set_xlabel("trace time (s)")
    axes[2].set_ylabel("SLO attainment (%)")
    axes[2].set_ylim(0, 105)
    axes[2].set_title(f"attainment over time (overall {100 * result['overall']['slo_attainment']:.1f}%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
