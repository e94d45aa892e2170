"""RemoteEngine: the agent's proxy for an engine in a worker process, with
the interface the agent uses of an in-process engine (EngineHandle).

generate() streams the same GenerationOutput objects and raises the same
engine errors (they travel as gRPC status codes, see wire.py); closing or
cancelling the stream cancels the call, which aborts the request in the
worker and frees its KV. stats() stays synchronous, as the agent's status
and load reports need it: it serves the latest stats, which a background
task refreshes every 100 ms and every state-changing call refreshes before
it returns.

A worker that dies ends every in-flight generate with WorkerLostError (gRPC
reports the broken socket; the exit watcher also cancels the calls, so
nothing waits on a dead process), and the on_lost listeners hear of it once.
A worker that hangs without dying (a deadlock, a wedged driver call) would
leave its requests waiting forever: one that has not answered a stats call
for `unresponsive_after_s` is killed, and then it is lost like any other."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from prism_client.v1 import engine_worker_pb2 as wpb
from services.gpu_agent.engine.errors import EngineError
from services.gpu_agent.engine.host_weights import ActivationTiming
from services.gpu_agent.engine.kv_pool import MemoryLimitState
from services.gpu_agent.engine.prompt import prompt_token_ids
from services.gpu_agent.engine.request import (
    EngineStats,
    GenerationOutput,
    GenerationRequest,
    ServingPath,
)
from services.gpu_agent.engine.tokenizer import Tokenizer
from services.gpu_agent.workers import wire
from services.gpu_agent.workers.errors import WorkerLostError
from services.gpu_agent.workers.worker_process import WorkerProcess

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.1
CONTROL_TIMEOUT_S = 30.0  # stats, limits, shutdown: never slow unless the worker is stuck
UNRESPONSIVE_AFTER_S = 20.0  # no stats reply for this long: the worker is hung and is killed
LOAD_TIMEOUT_S = 900.0  # reading a large checkpoint from a slow disk, with room to spare
EXIT_STATUS_WAIT_S = 2.0  # how long an error waits to learn how the worker ended, for its message

OnLost = Callable[[WorkerLostError], Awaitable[None]]


class RemoteEngine:
    def __init__(
        self,
        worker: WorkerProcess,
        name: str,
        loaded: wpb.LoadReply,
        stats: wpb.EngineStatsReply,
        unresponsive_after_s: float = UNRESPONSIVE_AFTER_S,
        model_path: str = "",
    ):
        self.worker = worker
        self.name = name
        self.device = loaded.device
        self.max_context = loaded.max_context
        self.weight_bytes = loaded.weight_bytes
        self.load_s = loaded.load_s
        self.kv_bytes_per_token = loaded.kv_bytes_per_token
        self.kv_bundle_bytes = loaded.kv_bundle_bytes
        self.weights_attached = loaded.weights_attached
        self.weights_shared = loaded.weights_shared
        self.serving_path = ServingPath(loaded.kv_pool, loaded.attention, loaded.cuda_graphs)
        self._model_path = model_path
        self._tokenizer: Tokenizer | None = None  # the agent's own copy, for counting prompt tokens
        self._stub = worker.stub
        self._stats = wire.stats_from_proto(stats)
        self._active = stats.active
        self._stats_requests = self._stats_applied = 0
        self._lost: WorkerLostError | None = None
        self._stopping = False
        self._on_lost: list[OnLost] = []
        self._calls: set[grpc.aio.Call] = set()
        self._unresponsive_after_s = unresponsive_after_s
        self._last_answer = time.monotonic()
        self._killed_as_hung = False
        self._followers: list[WorkerProcess] = []  # the workers of this engine's other tensor-parallel ranks
        self._follower_died: WorkerProcess | None = None
        worker.on_exit(self._worker_exited)
        self._refresher = asyncio.create_task(self._refresh_forever(), name=f"stats-{name}")

    @classmethod
    async def load(
        cls,
        worker: WorkerProcess,
        path: str,
        *,
        name: str,
        load_format: str = "auto",
        dtype: str = "auto",
        seed: int = 0,
        memory_limit_bytes: int = 0,
        kv_capacity_bytes: int = 0,
        shared_weights_path: str = "",
        max_context: int = 0,
        unresponsive_after_s: float = UNRESPONSIVE_AFTER_S,
        tensor_parallel: wpb.TensorParallelSpec | None = None,
        step_board: tuple[str, int] | None = None,
        prefix_caching: bool = True,
    ) -> RemoteEngine:
        """Loads the model into the (model-less) worker. On failure the worker is
        left as it is: the caller ends it. shared_weights_path: see EngineLoadSpec.
        tensor_parallel: this worker is rank 0 of a split model; its other ranks'
        workers load at the same time (load_shard_follower). step_board: (path, slot), see EngineLoadSpec."""
        spec = wpb.EngineLoadSpec(
            path=str(path),
            name=name,
            load_format=load_format,
            dtype=dtype,
            seed=seed,
            memory_limit_bytes=memory_limit_bytes or 0,
            kv_capacity_bytes=kv_capacity_bytes or 0,
            shared_weights_path=shared_weights_path,
            max_context=max_context or 0,
            tensor_parallel=tensor_parallel,
            step_board_path=step_board[0] if step_board else "",
            step_board_slot=step_board[1] if step_board else 0,
            no_prefix_caching=not prefix_caching,
        )
        try:
            loaded = await worker.stub.Load(spec, timeout=LOAD_TIMEOUT_S)
            stats = await worker.stub.Stats(wpb.EngineStatsRequest(), timeout=CONTROL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise await _load_error(worker, name, exc) from None
        log.info(
            "loaded %s into engine worker %d on %s in %.2fs%s",
            name,
            worker.pid,
            loaded.device,
            loaded.load_s,
            " (weights mapped from the shared host copy)" if loaded.weights_attached else "",
        )
        return cls(worker, name, loaded, stats, unresponsive_after_s, model_path=str(path))

    @staticmethod
    async def load_shard_follower(
        worker: WorkerProcess,
        path: str,
        *,
        name: str,
        tensor_parallel: wpb.TensorParallelSpec,
        load_format: str = "auto",
        dtype: str = "auto",
        seed: int = 0,
    ) -> wpb.LoadReply:
        """Loads rank tensor_parallel.rank (1 or more) of a split model into the
        worker, which then follows rank 0's engine until it stops (shard_follower.py);
        rank 0's worker must load at the same time (load)."""
        spec = wpb.EngineLoadSpec(
            path=str(path), name=name, load_format=load_format, dtype=dtype, seed=seed, tensor_parallel=tensor_parallel
        )
        try:
            loaded = await worker.stub.Load(spec, timeout=LOAD_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise await _load_error(worker, name, exc) from None
        log.info(
            "loaded rank %d of %s into engine worker %d on %s in %.2fs",
            tensor_parallel.rank,
            name,
            worker.pid,
            loaded.device,
            loaded.load_s,
        )
        return loaded

    # ---- state -----------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self.worker.pid

    @property
    def active(self) -> bool:
        return self._active

    @property
    def lost(self) -> WorkerLostError | None:
        return self._lost

    def stats(self) -> EngineStats:
        """The latest stats (at most about 100 ms old; fresh after any state change made here)."""
        return self._stats

    def count_prompt_tokens(self, req: GenerationRequest) -> int:
        # Tokenized here and again in the worker: a second pass over the prompt
        # costs far less than a round trip to the worker before admission.
        if self._tokenizer is None:
            self._tokenizer = Tokenizer(self._model_path)
        return len(prompt_token_ids(self._tokenizer, req))

    def on_lost(self, callback: OnLost) -> None:
        self._on_lost.append(callback)

    async def refresh_stats(self) -> EngineStats:
        # Replies may arrive out of order (a background refresh issued before a
        # state change, answered after the change's own refresh): the reply to
        # the latest request issued wins.
        self._stats_requests += 1
        ticket = self._stats_requests
        reply = await self._control(
            self._stub.Stats, wpb.EngineStatsRequest(), timeout=min(CONTROL_TIMEOUT_S, self._unresponsive_after_s)
        )
        self._last_answer = time.monotonic()
        if ticket > self._stats_applied:
            self._stats_applied = ticket
            self._stats, self._active = wire.stats_from_proto(reply), reply.active
        return self._stats

    async def _refresh_forever(self) -> None:
        while self._lost is None and not self._stopping:
            await asyncio.sleep(STATS_INTERVAL_S)
            try:
                await self.refresh_stats()
            except EngineError as exc:
                if self._lost is None and not self._stopping:
                    log.warning("stats of %s from engine worker %d: %s", self.name, self.pid, exc)
            silent_s = time.monotonic() - self._last_answer
            if silent_s > self._unresponsive_after_s and self._lost is None and not self._stopping:
                log.error(
                    "engine worker %d for %r has not answered for %.0fs; killing it", self.pid, self.name, silent_s
                )
                self._killed_as_hung = True
                self.worker.kill()  # the exit watcher then fails its requests (_worker_exited)
                return

    # ---- calls -----------------------------------------------------------------

    async def generate(self, req: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Streams the request's outputs; the last has finish_reason set.
        Invalid requests raise at the first iteration, before any output."""
        self._raise_if_gone()
        call = self._stub.Generate(wire.generation_request_to_proto(req, self.name))
        self._calls.add(call)
        try:
            async for response in call:
                yield wire.output_from_proto(response)
        except grpc.aio.AioRpcError as exc:
            raise await self._error_from(exc) from None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._lost is not None and not (task is not None and task.cancelling()):
                raise self._lost from None  # cancelled by _worker_exited, not by our caller
            raise
        finally:
            self._calls.discard(call)
            call.cancel()  # a consumer that stopped early: the worker aborts the request

    async def activate(self) -> ActivationTiming | None:
        reply = await self._control(self._stub.Activate, wpb.ActivateRequest(), timeout=None)
        await self.refresh_stats()
        return wire.timing_from_proto(reply)

    async def deactivate(self) -> None:
        await self._control(self._stub.Deactivate, wpb.DeactivateRequest(), timeout=None)
        await self.refresh_stats()

    async def set_memory_limit(self, nbytes: int, revision: int | None = None) -> MemoryLimitState:
        request = wpb.WorkerSetMemoryLimitRequest(memory_limit_bytes=nbytes)
        if revision is not None:
            request.revision = revision
        state = wire.limit_from_proto(await self._control(self._stub.SetMemoryLimit, request))
        await self.refresh_stats()
        return state

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Stops the engine and ends its worker (which is never reused)."""
        if self._stopping:
            return
        self._stopping = True
        self._refresher.cancel()
        if self.worker.alive:
            try:
                await self._stub.Shutdown(wpb.ShutdownRequest(), timeout=timeout_s)
                await asyncio.wait_for(self.worker.exited.wait(), timeout_s)
            except (grpc.aio.AioRpcError, TimeoutError) as exc:
                log.warning(
                    "engine worker %d did not shut down cleanly (%s); terminating it",
                    self.pid,
                    exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "timeout",
                )
        await self.worker.terminate(timeout_s)
        # Their follower threads ended with the engine. All at once: on 4 H200s each follower of a
        # 70B config took about 3 s to exit, and ended one after another, the last GPU got its
        # memory back 13 s after the unload.
        await asyncio.gather(*(follower.terminate(timeout_s) for follower in self._followers))

    def add_followers(self, workers: list[WorkerProcess]) -> None:
        """The workers of this engine's other tensor-parallel ranks: they end with
        it, and when one dies, so does this engine's worker (its steps would wait
        for that rank's all-reduces), which reports the engine lost."""
        self._followers = list(workers)
        for worker in workers:
            worker.on_exit(self._follower_exited)

    async def _follower_exited(self, worker: WorkerProcess) -> None:
        if self._stopping or self._lost is not None:
            return
        self._follower_died = worker
        log.error(
            "engine worker %d, a tensor-parallel rank of %r, died (%s): ending rank 0's worker %d",
            worker.pid,
            self.name,
            worker.exit_description(),
            self.pid,
        )
        await self.worker.terminate()

    # ---- failures --------------------------------------------------------------

    def _raise_if_gone(self) -> None:
        if self._lost is not None:
            raise self._lost
        if self._stopping:
            raise EngineError(f"engine {self.name!r} stopped")

    async def _control(self, method, request, timeout: float | None = CONTROL_TIMEOUT_S):
        self._raise_if_gone()
        try:
            return await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise await self._error_from(exc) from None

    async def _error_from(self, exc: grpc.aio.AioRpcError) -> EngineError:
        code = exc.code()
        if code in wire.CODE_TO_ERROR:
            return wire.CODE_TO_ERROR[code](exc.details())
        if self._stopping:
            return EngineError(f"engine {self.name!r} stopped")
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED) or not self.worker.alive:
            await _wait_exit(self.worker)
            if self._lost is None and not self.worker.alive:
                await self._worker_exited(self.worker)  # the exit watcher may not have run yet
            if self._lost is not None:
                return self._lost
            return WorkerLostError(
                f"engine worker {self.pid} for {self.name!r} is unreachable: {code.name}: {exc.details()}"
            )
        return EngineError(f"engine worker {self.pid} for {self.name!r}: {code.name}: {exc.details()}")

    async def _worker_exited(self, worker: WorkerProcess) -> None:
        if self._stopping or self._lost is not None:
            return
        why = "unresponsive, so killed" if self._killed_as_hung else "died"
        if self._follower_died is not None:
            why = (
                f"ended: worker {self._follower_died.pid} of another tensor-parallel rank died "
                f"({self._follower_died.exit_description()})"
            )
        self._lost = WorkerLostError(
            f"engine worker {worker.pid} for {self.name!r} on {worker.device} {why} ({worker.exit_description()})"
        )
        log.error("%s", self._lost)
        self._refresher.cancel()
        self._stats = EngineStats(
            running_requests=0,
            queued_requests=0,
            kv_used_bytes=0,
            memory_limit_bytes=self._stats.memory_limit_bytes,
            weight_bytes=self.weight_bytes,
            memory_limit_revision=self._stats.memory_limit_revision,
        )
        for call in list(self._calls):  # should gRPC not have noticed the broken socket yet
            call.cancel()
        for callback in self._on_lost:
            try:
                await callback(self._lost)
            except Exception:
                log.exception("handling the loss of engine worker %d failed", worker.pid)
        # Rank 0 gone: its other ranks wait in a step's collectives for it (on NCCL, until the timeout).
        await asyncio.gather(*(follower.terminate() for follower in self._followers if follower.alive))


async def _load_error(worker: WorkerProcess, name: str, exc: grpc.aio.AioRpcError) -> Exception:
    if exc.code() == grpc.StatusCode.UNAVAILABLE or not worker.alive:
        await _wait_exit(worker)
        return WorkerLostError(
            f"engine worker {worker.pid} on {worker.device} died while loading {name!r} ({worker.exit_description()})"
        )
    return wire.CODE_TO_ERROR.get(exc.code(), EngineError)(exc.details())


async def _wait_exit(worker: WorkerProcess) -> None:
    """Gives the exit watcher a moment to learn the exit status, for error messages."""
    try:
        await asyncio.wait_for(worker.exited.wait(), EXIT_STATUS_WAIT_S)
    except TimeoutError:
        pass
