"""Load without loss: many concurrent requests to a real CPU cluster (etcd,
scheduler, agents and gateway as processes, the tiny generated models), and
an account of how every one of them ended.

The mix (fixed by --seed): REST and gRPC half each; REST requests streamed or
not, completions or chat; some streams cancelled by the client after a chunk
or two (REST: the connection is closed; gRPC: the call is cancelled); a few
requests for a model that does not exist (their answer must be 404 /
NOT_FOUND). Every request has a deadline (--deadline-s) past which it counts
as hung. Each one ends as exactly one of:

  complete   the whole answer: REST 200 with finish_reason and usage (a stream
             ends with [DONE] after its usage chunk), gRPC OK after a response
             with a finish reason; exactly max_tokens tokens (ignore_eos)
  error      an explicit error, by kind: `http 503`, `sse model_unavailable`
             (an error event, then [DONE]), `grpc UNAVAILABLE` (with the
             gateway's x-request-id trailer, so it came from the gateway)
  cancelled  cancelled by us, as planned
  lost       anything else: past its deadline, a stream cut without [DONE] or
             error event, a connection reset, a gRPC failure the gateway did
             not send, an answer with the wrong number of tokens

The requests go in rounds (a warm-up round, then --rounds); after each round
the agents' accounting must come back to zero: every engine's KV in use, its
running and queued requests, the admission queue and the admission
reservations (GetStatus's kv_demand_bytes counts both, with the engine's own
demand), and the gateway's in-flight gauge; and each service process's RSS
is read (/proc/PID/status VmRSS), so growth round over round shows.

    python bench/load_soak.py [--requests 10000] [--concurrency 500] [--rounds 4] [--agents 2]
                              [--json bench/results/load_soak-HOST.json]

tests/test_load_without_loss.py runs the same at CI scale.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/load_soak.py`
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import httpx  # noqa: E402

from prism_client.v1 import agent_pb2, agent_pb2_grpc, gateway_pb2_grpc, generate_pb2  # noqa: E402

MODELS = ("tiny-llama", "tiny-qwen2")
MISSING_MODEL = "no-such-model"
REQUEST_ID_KEY = "x-request-id"
WORDS = (
    "the model serves a token stream over the cluster while memory moves between engines and requests "
    "come and go hello world prism gateway agent scheduler"
).split()

COMPLETE, ERROR, CANCELLED, LOST = "complete", "error", "cancelled", "lost"


# ---- the plan ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    index: int
    api: str  # "rest" | "grpc"
    model: str
    prompt: str
    max_tokens: int
    stream: bool  # REST: an SSE stream; gRPC calls always stream
    chat: bool  # REST only: /v1/chat/completions
    cancel_after: int  # cancel once this many chunks with a token arrived; 0: never

    @property
    def shape(self) -> str:
        if self.api == "grpc":
            return "grpc"
        return f"rest-{'chat' if self.chat else 'completion'}{'-stream' if self.stream else ''}"


def plan(
    count: int,
    *,
    seed: int = 0,
    start: int = 0,
    max_tokens: int = 8,
    cancel_fraction: float = 0.1,
    missing_fraction: float = 0.02,
    models: tuple[str, ...] = MODELS,
) -> list[Planned]:
    out = []
    for index in range(start, start + count):
        rng = random.Random(seed * 1_000_003 + index)
        api = "rest" if rng.random() < 0.5 else "grpc"
        stream = api == "grpc" or rng.random() < 0.5
        missing = rng.random() < missing_fraction
        cancel_after = rng.randint(1, 2) if stream and not missing and rng.random() < cancel_fraction else 0
        out.append(
            Planned(
                index=index,
                api=api,
                model=MISSING_MODEL if missing else rng.choice(models),
                prompt=" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 24))),
                max_tokens=rng.randint(max(2, max_tokens // 2), max_tokens),
                stream=stream,
                chat=api == "rest" and rng.random() < 0.3,
                cancel_after=cancel_after,
            )
        )
    return out


# ---- one request ---------------------------------------------------------------------------


@dataclass
class Outcome:
    index: int
    shape: str
    kind: str  # complete | error | cancelled | lost
    detail: str = ""  # the error's kind ("http 503", "sse model_unavailable", "grpc UNAVAILABLE"), or why lost
    latency_s: float = 0.0
    expected_error: bool = False  # a request for a model that does not exist
    model: str = ""
    started: float = 0.0  # time.monotonic() when it was sent
    ended: float = 0.0  # ... and when it ended

    @property
    def label(self) -> str:
        return f"{self.kind} {self.detail}".strip()


class _Cut(Exception):
    """The client cancels its request, as planned."""


def _body(p: Planned) -> dict:
    body: dict = {"model": p.model, "max_tokens": p.max_tokens, "temperature": 0, "ignore_eos": True}
    if p.chat:
        body["messages"] = [{"role": "user", "content": p.prompt}]
    else:
        body["prompt"] = p.prompt
    if p.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def _error_code(payload: object) -> str:
    if isinstance(payload, dict) and isinstance(payload.get("error"), dict):
        return str(payload["error"].get("code") or payload["error"].get("type") or "error")
    return "unknown"


def request_id(p: Planned) -> str:
    """Sent with each request (REST header, gRPC field), so the services' logs can be searched for it."""
    return f"soak-{p.index}"


async def _rest(client: httpx.AsyncClient, p: Planned) -> tuple[str, str]:
    path = "/v1/chat/completions" if p.chat else "/v1/completions"
    headers = {REQUEST_ID_KEY: request_id(p)}
    if not p.stream:
        response = await client.post(path, json=_body(p), headers=headers)
        if response.status_code != 200:
            return ERROR, f"http {response.status_code}"
        body = response.json()
        choice = body["choices"][0]
        tokens = body.get("usage", {}).get("completion_tokens")
        if choice.get("finish_reason") is None or tokens != p.max_tokens:
            return LOST, f"200 without a whole answer: finish_reason={choice.get('finish_reason')} tokens={tokens}"
        return COMPLETE, ""
    async with client.stream("POST", path, json=_body(p), headers=headers) as response:
        if response.status_code != 200:
            await response.aread()
            return ERROR, f"http {response.status_code}"
        chunks, finish, tokens, error, done = 0, None, None, None, False
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                done = True
                break
            event = json.loads(data)
            if "error" in event:
                error = _error_code(event)
                continue
            for choice in event.get("choices") or ():
                finish = choice.get("finish_reason") or finish
                delta = choice.get("delta", {}).get("content") if p.chat else choice.get("text")
                if delta is not None and choice.get("finish_reason") is None and (delta or not p.chat):
                    chunks += 1
            if event.get("usage"):
                tokens = event["usage"].get("completion_tokens")
            if p.cancel_after and chunks >= p.cancel_after and not done and error is None:
                raise _Cut()  # leaving the block closes the connection mid-stream
    if error is not None:
        return ERROR, f"sse {error}"
    if not done:
        return LOST, f"stream ended without [DONE] or an error event after {chunks} chunk(s)"
    if finish is None or tokens != p.max_tokens:
        return LOST, f"[DONE] without a whole answer: finish_reason={finish} tokens={tokens}"
    return COMPLETE, ""


def _grpc_request(p: Planned) -> generate_pb2.GenerateRequest:
    return generate_pb2.GenerateRequest(
        request_id=request_id(p),
        model=p.model,
        prompt=p.prompt,
        sampling=generate_pb2.SamplingParams(max_tokens=p.max_tokens, temperature=0.0, ignore_eos=True),
    )


async def _grpc(stub: gateway_pb2_grpc.GatewayStub, p: Planned, deadline_s: float) -> tuple[str, str]:
    call = stub.Generate(_grpc_request(p), timeout=deadline_s + 5)  # our own deadline comes first
    chunks, finish, tokens = 0, generate_pb2.FINISH_REASON_UNSPECIFIED, 0
    try:
        async for response in call:
            tokens += len(response.token_ids)
            if response.finish_reason != generate_pb2.FINISH_REASON_UNSPECIFIED:
                finish = response.finish_reason
                if response.usage.completion_tokens != tokens:
                    return LOST, (f"usage says {response.usage.completion_tokens} tokens, {tokens} arrived")
            elif response.token_ids:
                chunks += 1
            if p.cancel_after and chunks >= p.cancel_after and finish == generate_pb2.FINISH_REASON_UNSPECIFIED:
                call.cancel()
                raise _Cut()
    except grpc.aio.AioRpcError as exc:
        trailers = dict(exc.trailing_metadata() or ())
        if REQUEST_ID_KEY not in trailers:  # not the gateway's answer: the connection broke
            return LOST, f"grpc {exc.code().name} without the gateway's trailers: {exc.details()}"
        return ERROR, f"grpc {exc.code().name}"
    except BaseException:
        call.cancel()
        raise
    if finish == generate_pb2.FINISH_REASON_UNSPECIFIED:
        return LOST, f"call ended OK without a finish reason after {tokens} token(s)"
    if tokens != p.max_tokens:
        return LOST, f"call ended with {tokens} tokens, {p.max_tokens} asked for"
    return COMPLETE, ""


class Clients:
    """The load's HTTP client and gRPC channels (a few, so the calls spread over connections)."""

    def __init__(self, http_url: str, grpc_target: str, concurrency: int, channels: int = 4):
        self.http = httpx.AsyncClient(
            base_url=http_url,
            timeout=httpx.Timeout(None),
            limits=httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8),
        )
        self.channels = [
            grpc.aio.insecure_channel(grpc_target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(channels)
        ]
        self.stubs = [gateway_pb2_grpc.GatewayStub(c) for c in self.channels]

    async def close(self) -> None:
        await self.http.aclose()
        await asyncio.gather(*(c.close() for c in self.channels))


async def send(clients: Clients, p: Planned, deadline_s: float) -> Outcome:
    start = time.monotonic()
    outcome = Outcome(p.index, p.shape, LOST, expected_error=p.model == MISSING_MODEL, model=p.model)
    try:
        if p.api == "rest":
            work = _rest(clients.http, p)
        else:
            work = _grpc(clients.stubs[p.index % len(clients.stubs)], p, deadline_s)
        outcome.kind, outcome.detail = await asyncio.wait_for(work, deadline_s)
    except _Cut:
        outcome.kind = CANCELLED
    except TimeoutError:
        outcome.detail = f"no end within the {deadline_s:g}s deadline (hung)"
    except httpx.HTTPError as exc:  # reset, cut mid-body, refused connection
        outcome.detail = f"{type(exc).__name__}: {exc}"
    except (ValueError, KeyError, IndexError, TypeError) as exc:  # a body that is not what it should be
        outcome.detail = f"malformed answer: {type(exc).__name__}: {exc}"
    outcome.started, outcome.ended = start, time.monotonic()
    outcome.latency_s = outcome.ended - start
    return outcome


async def run_requests(
    http_url: str, grpc_target: str, planned: list[Planned], *, concurrency: int, deadline_s: float
) -> list[Outcome]:
    """Sends every planned request, at most `concurrency` at a time; one Outcome each, in plan order."""
    clients = Clients(http_url, grpc_target, concurrency)
    gate = asyncio.Semaphore(concurrency)

    async def one(p: Planned) -> Outcome:
        async with gate:
            return await send(clients, p, deadline_s)

    try:
        return list(await asyncio.gather(*(one(p) for p in planned)))
    finally:
        await clients.close()


class BackgroundLoad:
    """`workers` clients sending requests back to back, from an event loop on a thread of its own, until
    the block ends (fault tests: requests before, during and after a fault). make(i) plans request i;
    every Outcome is kept, in the order they ended."""

    def __init__(
        self,
        http_url: str,
        grpc_target: str,
        make: Callable[[int], Planned],
        *,
        workers: int = 8,
        deadline_s: float = 60.0,
        pause_after_error_s: float = 0.05,
    ):
        self.http_url, self.grpc_target = http_url, grpc_target
        self.make = make
        self.workers = workers
        self.deadline_s = deadline_s
        self.pause_after_error_s = pause_after_error_s  # errors come fast during an outage: not thousands
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        clients = Clients(self.http_url, self.grpc_target, self.workers)
        counter = itertools.count()

        async def worker() -> None:
            while not self._stop.is_set():
                outcome = await send(clients, self.make(next(counter)), self.deadline_s)
                self.outcomes.append(outcome)
                if outcome.kind != COMPLETE:
                    await asyncio.sleep(self.pause_after_error_s)

        try:
            await asyncio.gather(*(worker() for _ in range(self.workers)))
        finally:
            await clients.close()

    def ended_since(self, since: float) -> list[Outcome]:
        return [o for o in list(self.outcomes) if o.ended >= since]

    def wait_for(self, check: Callable[[list[Outcome]], bool], what: str, timeout_s: float) -> None:
        """Until check(outcomes so far) holds; AssertionError after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while not check(list(self.outcomes)):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what}; outcomes: {dict(Counter(o.label for o in self.outcomes))}"
                )
            time.sleep(0.02)

    def __enter__(self) -> BackgroundLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        # Each worker ends after its request in flight, which ends by its deadline.
        self._thread.join(self.deadline_s + 30)
        if self._thread.is_alive():
            raise AssertionError("the background load did not stop")


# ---- the cluster's side: accounting and memory ----------------------------------------------


ACCOUNTING_FIELDS = ("kv_used_bytes", "running_requests", "queued_requests", "admission_queued", "kv_demand_bytes")


def agent_accounting(agent_addresses: dict[str, str], timeout_s: float = 5.0) -> dict[str, dict[str, dict[str, int]]]:
    """agent -> model -> the GetStatus numbers that must be zero when no request is in flight."""
    out = {}
    for name, address in agent_addresses.items():
        with grpc.insecure_channel(address) as channel:
            status = agent_pb2_grpc.AgentStub(channel).GetStatus(agent_pb2.GetStatusRequest(), timeout=timeout_s)
        out[name] = {e.model: {f: getattr(e, f) for f in ACCOUNTING_FIELDS} for e in status.engines}
    return out


def gateway_in_flight(http_url: str) -> float:
    """The sum of the gateway's prism_gateway_requests_in_flight gauge."""
    text = httpx.get(http_url + "/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("prism_gateway_requests_in_flight")
    )


def wait_until_idle(agent_addresses: dict[str, str], http_url: str, timeout_s: float = 20.0) -> dict:
    """Polls until every agent's accounting and the gateway's in-flight gauge are zero; returns the last
    reading ({"agents": ..., "gateway_in_flight": ..., "idle": bool})."""
    deadline = time.monotonic() + timeout_s
    while True:
        agents = agent_accounting(agent_addresses)
        in_flight = gateway_in_flight(http_url)
        idle = in_flight == 0 and all(
            v == 0 for models in agents.values() for numbers in models.values() for v in numbers.values()
        )
        if idle or time.monotonic() > deadline:
            return {"agents": agents, "gateway_in_flight": in_flight, "idle": idle}
        time.sleep(0.2)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for pid {pid}")


def service_pids(cluster) -> dict[str, int]:
    """Every process of a LocalCluster: its services and its etcd."""
    pids = {name: proc.pid for name, proc in cluster.processes.items() if proc.poll() is None}
    if cluster.etcd is not None and cluster.etcd.process is not None:
        pids["etcd"] = cluster.etcd.process.pid
    return pids


# ---- rounds and the summary ------------------------------------------------------------------


@dataclass
class Round:
    name: str
    outcomes: list[Outcome]
    wall_s: float
    rss_after: dict[str, int]
    idle: dict = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summarize(outcomes: list[Outcome]) -> dict:
    kinds = Counter(o.kind for o in outcomes)
    latencies = [o.latency_s for o in outcomes if o.kind == COMPLETE]
    return {
        "requests": len(outcomes),
        "completed": kinds[COMPLETE],
        "errors": kinds[ERROR],
        "errors_by_kind": dict(sorted(Counter(o.detail for o in outcomes if o.kind == ERROR).items())),
        "unexpected_errors": dict(
            sorted(Counter(o.detail for o in outcomes if o.kind == ERROR and not o.expected_error).items())
        ),
        "missing_model_ends": dict(sorted(Counter(o.label for o in outcomes if o.expected_error).items())),
        "cancelled": kinds[CANCELLED],
        "lost": kinds[LOST],
        "lost_examples": [
            f"#{o.index} {o.shape} after {o.latency_s:.3f}s: {o.detail}" for o in outcomes if o.kind == LOST
        ][:20],
        "by_shape": {
            shape: dict(Counter(o.label for o in outcomes if o.shape == shape))
            for shape in sorted({o.shape for o in outcomes})
        },
        "latency_p50_s": percentile(latencies, 0.5),
        "latency_p99_s": percentile(latencies, 0.99),
        "latency_max_s": max(latencies, default=None),
    }


async def soak(
    cluster,
    *,
    requests: int,
    rounds: int,
    concurrency: int,
    warmup: int,
    deadline_s: float,
    max_tokens: int = 8,
    cancel_fraction: float = 0.1,
    seed: int = 0,
    models: tuple[str, ...] = MODELS,
    log=print,
) -> dict:
    """A warm-up round of `warmup` requests, then `rounds` rounds sharing `requests`; after each,
    the cluster must come back to idle and every process's RSS is read."""
    pids = service_pids(cluster)
    rss_before = {name: rss_bytes(pid) for name, pid in pids.items()}
    per_round = [requests // rounds + (1 if i < requests % rounds else 0) for i in range(rounds)]
    done: list[Round] = []
    start = 0
    for i, count in enumerate([warmup, *per_round]):
        name = "warm-up" if i == 0 else f"round {i}"
        planned = plan(
            count, seed=seed, start=start, max_tokens=max_tokens, cancel_fraction=cancel_fraction, models=models
        )
        start += count
        began = time.monotonic()
        outcomes = await run_requests(
            cluster.http_url, cluster.gateway_grpc, planned, concurrency=concurrency, deadline_s=deadline_s
        )
        wall_s = time.monotonic() - began
        idle = await asyncio.to_thread(wait_until_idle, cluster.agent_addresses, cluster.http_url)
        rss = {name_: rss_bytes(pid) for name_, pid in pids.items()}
        done.append(Round(name, outcomes, wall_s, rss, idle))
        s = summarize(outcomes)
        log(
            f"{name}: {s['requests']} requests in {wall_s:.1f}s: {s['completed']} complete, {s['errors']} errors "
            f"{s['errors_by_kind']}, {s['cancelled']} cancelled, {s['lost']} lost; idle after: {idle['idle']}; "
            f"RSS MiB " + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in rss.items())
        )
    measured = [o for r in done[1:] for o in r.outcomes]
    return {
        "summary": summarize(measured),
        "warmup": summarize(done[0].outcomes),
        "rounds": [
            {
                "name": r.name,
                "wall_s": round(r.wall_s, 2),
                "rss_after": r.rss_after,
                "idle": r.idle,
                **{k: v for k, v in summarize(r.outcomes).items() if k != "by_shape"},
            }
            for r in done
        ],
        "rss_before": rss_before,
        "rss_after": done[-1].rss_after,
        "rss_last_round_growth": {k: done[-1].rss_after[k] - done[-2].rss_after[k] for k in pids},
        "pids": pids,
        "settings": {
            "requests": requests,
            "rounds": rounds,
            "concurrency": concurrency,
            "warmup": warmup,
            "deadline_s": deadline_s,
            "max_tokens": max_tokens,
            "cancel_fraction": cancel_fraction,
            "seed": seed,
            "agents": len(cluster.agent_addresses),
        },
    }


# ---- the cluster ---------------------------------------------------------------------------


def load_cluster(
    state: Path,
    *,
    agents: int = 2,
    cpu_memory_gb: float = 1.0,
    agent_args: tuple[str, ...] = (),
    gateway_args: tuple[str, ...] = (),
):
    """A LocalCluster for the soak: both tiny models on every agent (static policy, one replica per agent),
    engines inline on the CPU. Not started."""
    from prism.cluster import LocalCluster
    from prism.tiny_models import ensure_default_models
    from services.common.etcd_server import free_port

    models = ensure_default_models(state / "models")
    config = {
        "policy": "static",
        "models": [
            {"model_name": name, "model_path": str(path), "init_placements": [{"gpu_ids": [0], "on": True}] * agents}
            for name, path in sorted(models.items())
        ],
    }
    state.mkdir(parents=True, exist_ok=True)
    (state / "models.json").write_text(json.dumps(config))
    return LocalCluster(
        state_dir=state,
        config_path=state / "models.json",
        http_port=free_port(),
        grpc_port=free_port(),
        device="cpu",
        cpu_memory_gb=cpu_memory_gb,
        engine_isolation="inline",
        agents=agents,
        agent_args=agent_args,
        gateway_args=gateway_args,
    )


def report_table(result: dict) -> str:
    from bench.common import table

    s = result["summary"]
    rows = [
        {
            "requests": s["requests"],
            "completed": s["completed"],
            "errors": s["errors"],
            "by_kind": ", ".join(f"{k}: {v}" for k, v in s["errors_by_kind"].items()) or "-",
            "cancelled": s["cancelled"],
            "lost": s["lost"],
            "p50": s["latency_p50_s"] and s["latency_p50_s"] * 1000,
            "p99": s["latency_p99_s"] and s["latency_p99_s"] * 1000,
        }
    ]
    out = [
        table(
            rows,
            [
                ("requests", "requests", "d"),
                ("completed", "completed", "d"),
                ("errors", "errors", "d"),
                ("by_kind", "errors by kind", ""),
                ("cancelled", "cancelled", "d"),
                ("lost", "lost", "d"),
                ("p50", "p50 ms", ".0f"),
                ("p99", "p99 ms", ".0f"),
            ],
        )
    ]
    rss_rows = [
        {
            "process": name,
            "before": result["rss_before"][name] / 2**20,
            "after": result["rss_after"][name] / 2**20,
            "last": result["rss_last_round_growth"][name] / 2**20,
        }
        for name in result["rss_before"]
    ]
    out.append(
        table(
            rss_rows,
            [
                ("process", "process", ""),
                ("before", "RSS before MiB", ".1f"),
                ("after", "RSS after MiB", ".1f"),
                ("last", "last round +MiB", ".1f"),
            ],
        )
    )
    processes = list(result["rss_before"])
    round_rows = [
        {
            "name": r["name"],
            "requests": r["requests"],
            "wall": r["wall_s"],
            "rate": r["requests"] / r["wall_s"] if r["wall_s"] else None,
            "lost": r["lost"],
            "p99": r["latency_p99_s"] and r["latency_p99_s"] * 1000,
            "idle": "yes" if r["idle"].get("idle") else "NO",
            **{name: r["rss_after"][name] / 2**20 for name in processes},
        }
        for r in result["rounds"]
    ]
    out.append(
        table(
            round_rows,
            [
                ("name", "round", ""),
                ("requests", "requests", "d"),
                ("wall", "wall s", ".1f"),
                ("rate", "req/s", ".1f"),
                ("lost", "lost", "d"),
                ("p99", "p99 ms", ".0f"),
                ("idle", "idle after", ""),
                *((name, f"{name} MiB", ".1f") for name in processes),
            ],
        )
    )
    return "\n\n".join(out)


def machine() -> dict:
    """The CPUs the whole cluster and the load shared."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "machine": f"{os.uname().sysname} {os.uname().machine}",
        "note": "etcd, scheduler, agents, gateway and the load generator all on this machine",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--requests", type=int, default=10000, help="requests after the warm-up, over every round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=None, help="requests of the warm-up round (default: one round's)")
    p.add_argument("--concurrency", type=int, default=500)
    p.add_argument("--agents", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--cancel-fraction", type=float, default=0.1, help="of the streamed requests")
    p.add_argument("--deadline-s", type=float, default=120.0, help="a request not ended by then is hung (lost)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--state-dir", type=Path, default=None, help="the cluster's files (default: a temporary folder)")
    p.add_argument("--json", type=Path, default=None, help="write the result here")
    args = p.parse_args(argv)
    if args.requests < args.rounds or args.rounds < 2:
        p.error("--rounds must be at least 2 and --requests at least --rounds")

    from bench.common import environment, write_json

    with tempfile.TemporaryDirectory(prefix="load-soak-") as tmp:
        cluster = load_cluster(args.state_dir or Path(tmp), agents=args.agents)
        cluster.start()
        try:
            result = asyncio.run(
                soak(
                    cluster,
                    requests=args.requests,
                    rounds=args.rounds,
                    concurrency=args.concurrency,
                    warmup=args.warmup if args.warmup is not None else args.requests // args.rounds,
                    deadline_s=args.deadline_s,
                    max_tokens=args.max_tokens,
                    cancel_fraction=args.cancel_fraction,
                    seed=args.seed,
                )
            )
        finally:
            cluster.stop()
    env = environment()
    env.update(machine())
    result = {"environment": env, **result}
    print()
    print(report_table(result))
    write_json(args.json, result)
    return 1 if result["summary"]["lost"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
