"""SGLangEngine: an SGLang server (with kvcached) behind the agent's
EngineHandle interface, as the built-in engine's InlineEngine and
RemoteEngine are.

- start(): launches the server (launch.py), waits for /health within a
  timeout (failing with the server's log tail if it exits or never becomes
  healthy), then, with kvcached, waits for the instance's kvcached segment
  (its absence means kvcached did not hook into SGLang) and applies the
  initial KV limit at revision 0.
- generate(): tokenizes the prompt with the model's own tokenizer (the same
  count admission reserved by; a chat is rendered with the model's template)
  and streams /generate with a request id of its own; closing or cancelling
  the stream aborts the request in SGLang (/abort_request, and the closed
  connection). SGLang's refusals and aborts become the engine's errors.
- set_memory_limit(): kvcached's per-instance limit (kvcached_limit.py),
  with the built-in engine's revision semantics.
- deactivate()/activate(): the requests in flight end with
  EngineInactiveError and are aborted, and once SGLang reports itself idle
  (/v1/loads; it dies on a release while busy) /release_memory_occupation; on
  activation /resume_memory_occupation and one generated token (not
  SGLang's /health, which polls its own one-token request once a second),
  timed.
- stats(): synchronous, as the agent needs: request counts from the driver's
  own bookkeeping (exact, where SGLang's gauges update only every few
  steps), KV bytes from kvcached's segment (or /metrics' token counts
  without kvcached), refreshed by a background task.
- A server that exits unexpectedly ends every stream with WorkerLostError
  (with its log tail) and is reported to on_lost listeners once.
- stop(): SIGTERM to the server's process group, SIGKILL after a timeout."""

from __future__ import annotations

import asyncio
import itertools
import logging
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from services.gpu_agent.engine.errors import EngineError, EngineInactiveError, InvalidRequestError
from services.gpu_agent.engine.host_weights import ActivationTiming
from services.gpu_agent.engine.kv_pool import MemoryLimitState
from services.gpu_agent.engine.prompt import prompt_token_ids
from services.gpu_agent.engine.request import (
    DEMAND_GROWTH_TOKENS,
    EngineStats,
    GenerationOutput,
    GenerationRequest,
    ServingPath,
)
from services.gpu_agent.engine.tokenizer import Tokenizer
from services.gpu_agent.host_checks import SGLANG_VERIFIED
from services.gpu_agent.sglang.client import ChunkDecoder, SGLangClient, SGLangHTTPError
from services.gpu_agent.sglang.kvcached_limit import (
    KVCACHED_PAGE_BYTES,
    SHM_DIR,
    KvcachedLimit,
    KvcachedSegment,
    KvcachedUsage,
)
from services.gpu_agent.sglang.launch import SGLangLaunchConfig, build_command, build_env, resolve_port, sglang_dtype
from services.gpu_agent.sglang.metrics import SGLangMetrics, parse_sglang_metrics
from services.gpu_agent.sglang.model_info import ModelInfo, read_model_info
from services.gpu_agent.sglang.process import ServerProcess
from services.gpu_agent.workers.errors import WorkerLostError, WorkerStartError

log = logging.getLogger(__name__)

START_TIMEOUT_S = 900.0  # loading a large checkpoint and capturing CUDA graphs, with room to spare
HEALTH_POLL_S = 0.5
# GET /health: SGLang 0.5.15 answers 503 while starting, then by default runs a one-token generation and
# answers after >= 1 s (it polls every second), or 503 after SGLANG_HEALTH_CHECK_TIMEOUT (20 s).
HEALTH_TIMEOUT_S = 25.0
SEGMENT_TIMEOUT_S = 30.0
STATS_INTERVAL_S = 0.2
STOP_TIMEOUT_S = 30.0
MEMORY_CALL_TIMEOUT_S = 120.0  # release/resume: copying tens of GB between host and device
ABORT_TIMEOUT_S = 5.0
IDLE_POLL_S = 0.05  # polling /v1/loads before a release
NO_LOADS_SETTLE_S = 1.0  # before a release, where /v1/loads has no snapshot
LOG_TAIL_LINES = 30

OnLost = Callable[[WorkerLostError], Awaitable[None]]


@dataclass
class DriverOptions:
    start_timeout_s: float = START_TIMEOUT_S
    health_poll_s: float = HEALTH_POLL_S
    health_timeout_s: float = HEALTH_TIMEOUT_S
    segment_timeout_s: float = SEGMENT_TIMEOUT_S
    stats_interval_s: float = STATS_INTERVAL_S
    stop_timeout_s: float = STOP_TIMEOUT_S
    memory_call_timeout_s: float = MEMORY_CALL_TIMEOUT_S
    control_timeout_s: float = 30.0
    stream_read_timeout_s: float = 600.0
    log_dir: Path | None = None  # None: a new temporary folder (kept after stop, for post-mortems)
    shm_dir: Path = SHM_DIR
    page_bytes: int = KVCACHED_PAGE_BYTES  # kvcached's page (KVCACHED_PAGE_SIZE_MB in extra_env changes it)
    # SGLang's sampling_params.sampling_seed. SGLang 0.5.15 honours it only with
    # --enable-deterministic-inference (SGLangLaunchConfig.deterministic_inference), so it is sent only then.
    send_sampling_seed: bool = True


def sglang_rid(n: int, request_id: str) -> str:
    """The SGLang request id of this engine's n-th request. SGLang's
    scheduler aborts every request whose id *starts with* the one given
    (0.5.15 managers/scheduler.py, abort_request), and treats ids starting
    with HEALTH_CHECK as health checks, so the id leads with the engine's
    unique counter and a separator: no id is a prefix of another."""
    return f"{n}-{request_id}"


class SGLangStartError(WorkerStartError):
    """The server exited, or did not become ready, during start-up."""


@dataclass
class _Flight:
    rid: str
    prompt_tokens: int
    max_tokens: int
    completion_tokens: int = 0
    started: bool = False  # its first output arrived
    response: httpx.Response | None = None
    failure: EngineError | None = None  # set when the driver ends it (deactivate, stop, lost)
    ended: asyncio.Event = field(default_factory=asyncio.Event)


def sglang_serving_path(config: SGLangLaunchConfig, kvcached: bool) -> ServingPath:
    """How an SGLang server serves: its KV pool (kvcached's, or its own static one), the attention backend
    its extra arguments name (else SGLang's default), CUDA graphs unless they are disabled."""
    extra = list(config.extra_args)
    backend = extra[extra.index("--attention-backend") + 1] if "--attention-backend" in extra[:-1] else "sglang"
    return ServingPath("kvcached" if kvcached else "sglang", backend, "--disable-cuda-graph" not in extra)


class SGLangEngine:
    def __init__(
        self,
        config: SGLangLaunchConfig,
        info: ModelInfo,
        process: ServerProcess,
        client: SGLangClient,
        limit: KvcachedLimit | None,
        options: DriverOptions,
        initial_limit_bytes: int,
    ):
        self.config = config
        self.info = info
        self.process = process
        self.client = client
        self.options = options
        self.name = config.name
        self.device = (
            f"cuda:{config.gpu_ids[0]}"
            if len(config.gpu_ids) == 1
            else "cuda:" + ",".join(str(g) for g in config.gpu_ids)
        )
        self.max_context = config.max_context or info.max_context
        self.weight_bytes = info.weight_bytes
        self.kv_bytes_per_token = info.kv_bytes_per_token_over(config.tp_size)
        self._limit = limit
        # kvcached's unit: one page of every layer's K and V buffer, per rank.
        self.kv_bundle_bytes = limit.bundle_bytes if limit is not None else self.kv_bytes_per_token
        self.serving_path = sglang_serving_path(config, kvcached=limit is not None)
        self._static_limit = MemoryLimitState("applied", initial_limit_bytes, initial_limit_bytes, 0, 0)
        self._tokenizer: Tokenizer | None = None
        self._flights: dict[str, _Flight] = {}
        self._rids = itertools.count(1)
        self._seed_warned = False
        self._active = True
        self._stopping = False
        self._lost: WorkerLostError | None = None
        self._on_lost: list[OnLost] = []
        self._activation_lock = asyncio.Lock()
        self._background: set[asyncio.Task] = set()
        self._usage: KvcachedUsage | None = limit.usage() if limit is not None else None
        self._metrics: SGLangMetrics | None = None
        self._refresh_failures: dict[str, str] = {}
        self.last_deactivate_s: float | None = None
        self.last_activation: ActivationTiming | None = None
        self.sglang_version: str | None = None  # as the server reports it
        self._refresher = asyncio.create_task(self._refresh_forever(), name=f"sglang-stats-{self.name}")
        self._watcher = asyncio.create_task(self._watch_exit(), name=f"sglang-watch-{self.name}")

    # ---- start -----------------------------------------------------------------

    @classmethod
    async def start(
        cls, config: SGLangLaunchConfig, memory_limit_bytes: int = 0, options: DriverOptions | None = None
    ) -> SGLangEngine:
        """Starts the server and returns once it serves. memory_limit_bytes:
        the initial KV limit (0: none, the pool's whole virtual capacity,
        until the memory coordinator sets one)."""
        options = options or DriverOptions()
        info = read_model_info(config.model_path, sglang_dtype(config.dtype), config.load_format)
        config = resolve_port(config)
        log_dir = options.log_dir or Path(tempfile.mkdtemp(prefix="prism-sglang-"))
        log_path = Path(log_dir) / f"sglang-{config.name.replace('/', '_')}-{config.port}.log"
        argv, env = build_command(config), build_env(config)
        segment = KvcachedSegment(config.kvcached_ipc_name, options.shm_dir) if config.kvcached else None
        if segment is not None and segment.remove():
            log.warning("removed a stale kvcached segment %s left by an earlier server", segment.path)
        process = await ServerProcess.start(argv, env, log_path)
        client = SGLangClient(config.base_url, options.control_timeout_s, options.stream_read_timeout_s)
        try:
            await _wait_healthy(process, client, config, options)
            version = await _server_version(client, config)
            limit = None
            if segment is not None:
                rank_bundle = options.page_bytes * 2 * info.num_layers
                limit = KvcachedLimit(segment, rank_bundle, config.tp_size, options.page_bytes)
                await _attach_limit(process, limit, memory_limit_bytes, config, options)
        except BaseException:
            await client.aclose()
            await process.terminate(options.stop_timeout_s)
            if segment is not None:
                segment.remove()
            raise
        log.info(
            "SGLang server for %s serves at %s (pid %d, GPUs %s, kvcached %s)",
            config.name,
            config.base_url,
            process.pid,
            list(config.gpu_ids),
            config.kvcached_ipc_name if config.kvcached else "off",
        )
        engine = cls(config, info, process, client, limit, options, memory_limit_bytes)
        engine.sglang_version = version
        return engine

    # ---- state -----------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def active(self) -> bool:
        return self._active

    @property
    def lost(self) -> WorkerLostError | None:
        return self._lost

    def on_lost(self, callback: OnLost) -> None:
        self._on_lost.append(callback)

    def stats(self) -> EngineStats:
        flights = list(self._flights.values())
        running = sum(1 for f in flights if f.started)
        demand = sum(
            min(f.prompt_tokens + f.max_tokens, f.prompt_tokens + f.completion_tokens + DEMAND_GROWTH_TOKENS)
            for f in flights
        )
        if self._limit is not None:
            usage = self._usage
            state = self._limit.state(usage=usage) if usage is not None else self._limit.state()
            used = usage.used_bytes if usage else 0
            free_tokens = max(0, state.effective_limit_bytes - used) // max(1, self.kv_bytes_per_token)
        else:
            state = self._static_limit
            metrics = self._metrics
            used = metrics.used_tokens * self.kv_bytes_per_token if metrics else 0
            free_tokens = (metrics.free_tokens or 0) if metrics else 0
            state = MemoryLimitState(state.status, state.limit_bytes, state.effective_limit_bytes, used, state.revision)
        return EngineStats(
            running_requests=running,
            queued_requests=len(flights) - running,
            kv_used_bytes=used,
            memory_limit_bytes=state.limit_bytes,
            weight_bytes=self.weight_bytes,
            kv_mapped_bytes=state.mapped_bytes,
            kv_free_tokens=free_tokens,
            memory_limit_revision=state.revision,
            memory_limit_status=state.status,
            kv_demand_tokens=demand,
        )

    def sglang_metrics(self) -> SGLangMetrics | None:
        """The latest /metrics summary (None before the first scrape)."""
        return self._metrics

    async def refresh_stats(self) -> EngineStats:
        if self._limit is not None:
            self._usage = await asyncio.to_thread(self._limit.usage)
        if self.config.enable_metrics and self._lost is None and not self._stopping:
            self._metrics = parse_sglang_metrics(await self.client.metrics_text(self.options.control_timeout_s))
        return self.stats()

    async def _refresh_forever(self) -> None:
        while self._lost is None and not self._stopping:
            await asyncio.sleep(self.options.stats_interval_s)
            try:
                await self.refresh_stats()
                self._refresh_failures.clear()
            except Exception as exc:  # reported once per kind of failure, not every 200 ms
                kind = type(exc).__name__
                if self._lost is None and not self._stopping and self._refresh_failures.get(kind) != str(exc):
                    log.warning("stats of %s from its SGLang server: %s: %s", self.name, kind, exc)
                self._refresh_failures[kind] = str(exc)

    # ---- requests --------------------------------------------------------------

    def _tokenize(self, req: GenerationRequest) -> list[int]:
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self.config.model_path)
        return prompt_token_ids(self._tokenizer, req)

    def count_prompt_tokens(self, req: GenerationRequest) -> int:
        n = len(self._tokenize(req))
        if self.max_context and n >= self.max_context:
            raise InvalidRequestError(
                f"the prompt has {n} tokens; {self.name!r} takes at most "
                f"{self.max_context - 1} so that one can be generated"
            )
        return n

    def _raise_if_unavailable(self) -> None:
        if self._lost is not None:
            raise self._lost
        if self._stopping:
            raise EngineError(f"engine {self.name!r} stopped")
        if not self._active:
            raise EngineInactiveError(f"model {self.name!r} is deactivated")

    def _payload(self, req: GenerationRequest, ids: list[int], rid: str, max_tokens: int) -> dict[str, Any]:
        sampling: dict[str, Any] = {
            "max_new_tokens": max_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "ignore_eos": req.ignore_eos,
        }
        if req.stop:
            sampling["stop"] = list(req.stop)
        if req.seed is not None and self.options.send_sampling_seed:
            if self.config.deterministic_inference:
                sampling["sampling_seed"] = req.seed
            elif not self._seed_warned:
                self._seed_warned = True
                log.warning(
                    "%s: SGLang ignores per-request seeds unless started with deterministic inference "
                    "(SGLangLaunchConfig.deterministic_inference); seeded requests are sampled unseeded",
                    self.name,
                )
        return {"rid": rid, "input_ids": ids, "sampling_params": sampling}

    async def generate(self, req: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Streams the request's outputs; the last has finish_reason set.
        Invalid requests raise at the first iteration, before any output."""
        self._raise_if_unavailable()
        ids = self._tokenize(req)
        if not ids:
            raise InvalidRequestError("the prompt encodes to no tokens")
        if self.max_context and len(ids) >= self.max_context:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens; {self.name!r} takes at most {self.max_context - 1}"
            )
        room = self.max_context - len(ids) if self.max_context else None
        if req.max_tokens is not None and req.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {req.max_tokens}")
        max_tokens = req.max_tokens if req.max_tokens is not None else room
        if max_tokens is None:
            raise InvalidRequestError(f"{self.name!r} has no known context length: give max_tokens")
        rid = sglang_rid(next(self._rids), req.request_id)
        flight = _Flight(rid, len(ids), max_tokens)
        self._flights[rid] = flight
        finished = False
        try:
            async with self.client.generate(self._payload(req, ids, rid, max_tokens)) as stream:
                flight.response = stream.response
                if flight.failure is not None:  # ended while the request was being sent
                    raise flight.failure
                decoder = ChunkDecoder(self.config.incremental_streaming, req.stop)
                async for event in stream.events():
                    out = decoder.feed(event)
                    if out is None:
                        continue
                    flight.started = True
                    flight.completion_tokens = out.completion_tokens
                    if out.finish_reason is not None:
                        finished = True
                    yield out
                    if finished:
                        break
            if not finished:  # the body ended early: a dying server's closed connection looks the same
                raise flight.failure or await self._transport_error(
                    EngineError("the stream ended without a finish reason"), rid
                )
        except EngineError as exc:
            raise flight.failure or exc from None
        except (httpx.HTTPError, httpx.StreamError) as exc:
            raise flight.failure or await self._transport_error(exc, rid) from None
        except Exception:
            if flight.failure is not None:  # its stream closed under it by the driver, whatever the error
                raise flight.failure from None
            raise
        finally:
            self._flights.pop(rid, None)
            flight.ended.set()
            if not finished and flight.failure is None and self._lost is None and not self._stopping:
                self._in_background(self._abort(rid), f"abort-{rid}")  # a consumer that stopped early

    async def _transport_error(self, exc: Exception, rid: str) -> EngineError:
        """The error for a stream that broke: the server's loss if it died
        (given a moment to be reaped), else the transport's."""
        if not self.process.alive or await self.process.wait_exit(1.0):
            await self._server_exited()
            if self._lost is not None:
                return self._lost
        return EngineError(f"request {rid} to the SGLang server of {self.name!r} failed: {type(exc).__name__}: {exc}")

    async def _abort(self, rid: str) -> None:
        try:
            await self.client.abort(rid, timeout_s=ABORT_TIMEOUT_S)
        except Exception as exc:  # the closed connection makes SGLang abort it as well
            log.warning("aborting request %s on the SGLang server of %s failed: %s", rid, self.name, exc)

    def _in_background(self, coro: Awaitable[None], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _end_flights(self, error: EngineError, abort_on_server: bool) -> None:
        """Ends every request in flight with `error`: they are aborted in
        SGLang and their streams closed (the generators then raise it)."""
        flights = list(self._flights.values())
        for flight in flights:
            flight.failure = error
        if abort_on_server and flights:
            try:
                await self.client.abort(abort_all=True, timeout_s=ABORT_TIMEOUT_S)
            except Exception as exc:
                log.warning("abort_all on the SGLang server of %s failed (%s); aborting one by one", self.name, exc)
                await asyncio.gather(*(self._abort(f.rid) for f in flights))
        for flight in flights:
            if flight.response is not None:
                await flight.response.aclose()

    # ---- memory ----------------------------------------------------------------

    async def set_memory_limit(self, nbytes: int, revision: int | None = None) -> MemoryLimitState:
        if self._lost is not None:
            raise self._lost
        if self._limit is None:
            if nbytes < 0:
                raise InvalidRequestError(f"the memory limit must be non-negative, got {nbytes}")
            raise EngineError(
                f"engine {self.name!r} runs SGLang without kvcached: its KV pool is fixed at start "
                "(--mem-fraction-static) and cannot follow a memory limit"
            )
        state = await asyncio.to_thread(self._limit.set, nbytes, revision)
        self._usage = await asyncio.to_thread(self._limit.usage)
        return state

    async def deactivate(self) -> None:
        """Ends the requests in flight (EngineInactiveError), then releases the
        server's GPU memory; the process stays, with the weights in host memory."""
        async with self._activation_lock:
            self._raise_if_gone()
            if not self._active:
                return
            self._active = False
            await self._end_flights(EngineInactiveError(f"model {self.name!r} was deactivated"), True)
            start = time.perf_counter()
            try:
                await asyncio.wait_for(self._release_when_idle(), self.options.memory_call_timeout_s)
            except TimeoutError:
                raise EngineError(
                    f"SGLang did not release the memory of {self.name!r} within {self.options.memory_call_timeout_s:g}s"
                ) from None
            self.last_deactivate_s = time.perf_counter() - start
            log.info("deactivated %s (SGLang released its memory in %.3fs)", self.name, self.last_deactivate_s)

    async def _release_when_idle(self) -> None:
        """/release_memory_occupation once SGLang is idle. In SGLang 0.5.15
        the scheduler *asserts* that it is fully idle when it handles the
        release (managers/scheduler_components/weight_updater.py), and an
        exception in the scheduler ends the whole server: a release sent while
        an aborted request still runs its last step would kill it. The aborts
        take a step or two to land, so the release waits until /v1/loads
        reports no running and no waiting request on every data-parallel
        rank, twice in a row (the scheduler publishes that snapshot from its
        idle loop). A server whose /v1/loads has no snapshot gets a settle
        time instead. An error answer is retried."""
        tags = list(self.config.memory_tags) if self.config.memory_tags else None
        while True:
            await self._wait_server_idle()
            try:
                await self.client.release_memory(tags)
                return
            except SGLangHTTPError as exc:
                log.info("SGLang refused to release the memory of %s yet (%s); retrying", self.name, exc.message)
                await asyncio.sleep(IDLE_POLL_S)
            except httpx.HTTPError as exc:  # a server that died in the call: its loss, with its log
                raise await self._transport_error(exc, "/release_memory_occupation") from None

    async def _wait_server_idle(self) -> None:
        idle_reads = 0
        while idle_reads < 2:
            try:
                loads = await self.client.loads()
            except SGLangHTTPError as exc:  # no /v1/loads: settle instead
                log.warning(
                    "SGLang /v1/loads of %s answered %s; waiting %.1fs for the aborts to land",
                    self.name,
                    exc.status,
                    NO_LOADS_SETTLE_S,
                )
                await asyncio.sleep(NO_LOADS_SETTLE_S)
                return
            if not loads:
                await asyncio.sleep(NO_LOADS_SETTLE_S)
                return
            busy = any(int(load.get("num_running_reqs", 0)) or int(load.get("num_waiting_reqs", 0)) for load in loads)
            idle_reads = 0 if busy else idle_reads + 1
            await asyncio.sleep(IDLE_POLL_S)

    async def activate(self) -> ActivationTiming | None:
        """Brings the weights and KV pool back; None if already active."""
        async with self._activation_lock:
            self._raise_if_gone()
            if self._active:
                return None
            tags = list(self.config.memory_tags) if self.config.memory_tags else None
            start = time.perf_counter()
            try:
                await asyncio.wait_for(self.client.resume_memory(tags), self.options.memory_call_timeout_s)
            except TimeoutError:
                raise EngineError(
                    f"SGLang did not resume the memory of {self.name!r} within {self.options.memory_call_timeout_s:g}s"
                ) from None
            resumed = time.perf_counter()
            await self._one_token_after_resume()
            self._active = True
            # SGLang does not split a resume into allocation and copy: copy_s is the whole call.
            timing = ActivationTiming(self.weight_bytes, 0.0, resumed - start, time.perf_counter() - resumed)
            self.last_activation = timing
            log.info(
                "activated %s in %.3fs (resume %.3fs, first token %.3fs)",
                self.name,
                timing.total_s,
                timing.copy_s,
                timing.ready_s,
            )
            return timing

    async def _one_token_after_resume(self) -> None:
        """Generates one token, as SGLang's own /health does, to know that
        its scheduler steps with the memory back. Not /health itself: it
        sends that request and then polls for an answer once a second
        (0.5.17 entrypoints/http_server.py, health_generate), so every
        activation waited a whole second for a step of a few milliseconds
        (on an H100 a 1B's activation took 1.29-1.49 s, 1.0 s of it /health)."""
        rid = sglang_rid(next(self._rids), "activation-check")
        payload = {"rid": rid, "input_ids": [0], "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}

        async def first_token() -> None:
            async with self.client.generate(payload) as stream:
                decoder = ChunkDecoder(incremental=True)
                async for event in stream.events():
                    out = decoder.feed(event)
                    if out is not None and out.finish_reason is not None:
                        return
            raise EngineError("its one-token request ended without a finish reason")

        try:
            await asyncio.wait_for(first_token(), self.options.health_timeout_s)
        except TimeoutError:
            raise EngineError(
                f"the SGLang server of {self.name!r} generated no token within "
                f"{self.options.health_timeout_s:g}s of resuming its memory"
            ) from None
        except (EngineError, httpx.HTTPError) as exc:
            raise EngineError(
                f"the SGLang server of {self.name!r} failed a one-token request after resuming its memory: {exc}"
            ) from None

    def _raise_if_gone(self) -> None:
        if self._lost is not None:
            raise self._lost
        if self._stopping:
            raise EngineError(f"engine {self.name!r} stopped")

    # ---- the process -----------------------------------------------------------

    async def _watch_exit(self) -> None:
        await self.process.exited.wait()
        await self._server_exited()

    async def _server_exited(self) -> None:
        if self._stopping or self._lost is not None:
            return
        self._lost = WorkerLostError(
            f"the SGLang server of {self.name!r} (pid {self.pid}) {self.process.exit_description()}; its log "
            f"({self.process.log_path}) ends:\n{self.process.log_tail(LOG_TAIL_LINES)}"
        )
        log.error("%s", self._lost)
        self._refresher.cancel()
        await self._end_flights(self._lost, abort_on_server=False)
        await self.process.terminate(self.options.stop_timeout_s)  # what is left of its group
        if self._limit is not None:
            self._limit.segment.remove()
        for callback in self._on_lost:
            try:
                await callback(self._lost)
            except Exception:
                log.exception("handling the loss of the SGLang server of %s failed", self.name)

    async def stop(self, timeout_s: float | None = None) -> None:
        """Ends the requests in flight (EngineError), then the server: SIGTERM
        to its process group, SIGKILL after timeout_s (default the options')."""
        if self._stopping:
            return
        self._stopping = True
        self._refresher.cancel()
        self._watcher.cancel()
        await self._end_flights(EngineError(f"engine {self.name!r} stopped"), abort_on_server=False)
        for task in list(self._background):
            task.cancel()
        await self.client.aclose()
        await self.process.terminate(self.options.stop_timeout_s if timeout_s is None else timeout_s)
        if self._limit is not None and self._limit.segment.remove():
            log.info("removed kvcached segment %s the server left", self._limit.segment.path)
        log.info("stopped the SGLang server of %s (pid %d, %s)", self.name, self.pid, self.process.exit_description())


async def _wait_healthy(
    process: ServerProcess, client: SGLangClient, config: SGLangLaunchConfig, options: DriverOptions
) -> None:
    deadline = time.monotonic() + options.start_timeout_s
    while True:
        if not process.alive:
            raise SGLangStartError(
                f"the SGLang server for {config.name!r} ({process.exit_description()}) exited during start-up; its "
                f"log ({process.log_path}) ends:\n{process.log_tail(LOG_TAIL_LINES)}"
            )
        if await client.health(max(1.0, min(options.health_timeout_s, deadline - time.monotonic()))):
            return
        if time.monotonic() >= deadline:
            raise SGLangStartError(
                f"the SGLang server for {config.name!r} (pid {process.pid}) did not become healthy within "
                f"{options.start_timeout_s:g}s at {config.base_url}/health; it was stopped. Its log "
                f"({process.log_path}) ends:\n{process.log_tail(LOG_TAIL_LINES)}"
            )
        await process.wait_exit(options.health_poll_s)


async def _server_version(client: SGLangClient, config: SGLangLaunchConfig) -> str | None:
    """The version /v1/loads reports; a warning where it is not one the
    driver was verified with (docs/sglang.md)."""
    try:
        version = await client.version()
    except (SGLangHTTPError, httpx.HTTPError, ValueError) as exc:
        log.warning("the SGLang server for %s does not say its version (%s)", config.name, exc)
        return None
    if version not in SGLANG_VERIFIED:
        log.warning(
            "the SGLang server for %s is version %s; the driver was verified with %s",
            config.name,
            version,
            ", ".join(SGLANG_VERIFIED),
        )
    return version


async def _attach_limit(
    process: ServerProcess, limit: KvcachedLimit, initial_bytes: int, config: SGLangLaunchConfig, options: DriverOptions
) -> None:
    deadline = time.monotonic() + options.segment_timeout_s
    while await asyncio.to_thread(limit.attach, initial_bytes) is None:
        if not process.alive:
            raise SGLangStartError(
                f"the SGLang server for {config.name!r} exited ({process.exit_description()}) "
                f"before kvcached started; its log ends:\n{process.log_tail(LOG_TAIL_LINES)}"
            )
        if time.monotonic() >= deadline:
            raise SGLangStartError(
                f"the SGLang server for {config.name!r} is healthy but kvcached's segment {limit.segment.path} did "
                f"not appear within {options.segment_timeout_s:g}s: kvcached is not active in the server (is it "
                f"installed in the server's Python, {config.python}, and does it support this SGLang version?). "
                f"Its log ends:\n{process.log_tail(LOG_TAIL_LINES)}"
            )
        await asyncio.sleep(0.1)
