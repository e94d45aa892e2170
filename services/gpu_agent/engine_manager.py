"""The engines this agent runs, one per placed model, and their life cycle.

An engine runs either in this process (inline: loading weights is slow and
blocking, so it runs in a thread), in its own worker process taken from a
WorkerPool (process isolation, warm start), or, for engine "sglang", as an
SGLang server process (services/gpu_agent/sglang); all are EngineHandles, and the
asyncio side only ever sees finished state changes. Every change is
published through `on_change` (the agent writes it to etcd) so the gateway
and the scheduler see an engine as loading, active, inactive, draining or
failed; a worker process that dies makes its engine "failed".

Unloading drains by default (drain()): the engine is published as draining,
so gateways send new requests to the model's other replicas (and to it only
while there is none), keeps serving what it has, and is unloaded once no
request is in flight, or at the drain timeout, when the requests left end
with an error that says so. unload() is the immediate way.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from prism_client.v1 import engine_worker_pb2 as wpb
from services.common.etcd_server import free_port
from services.gpu_agent.devices import Device
from services.gpu_agent.engine import Engine
from services.gpu_agent.engine.errors import CapacityError
from services.gpu_agent.engine.shared_weights import SharedWeightsFile, remove_shared_weights, shared_weights_name
from services.gpu_agent.engine.step_board import DeviceBoards
from services.gpu_agent.engine_handle import EngineHandle, InlineEngine
from services.gpu_agent.host_checks import SGLANG_VERIFIED, installed_version
from services.gpu_agent.request_stats import DEFAULT_WINDOW_S, ModelRequestStats
from services.gpu_agent.slo import ModelSlo
from services.gpu_agent.workers.errors import WorkerLostError
from services.gpu_agent.workers.remote_engine import RemoteEngine
from services.gpu_agent.workers.worker_pool import WorkerPool

if TYPE_CHECKING:  # the driver's module imports httpx, which comes with the sglang extra (see _start_sglang)
    from services.gpu_agent.sglang.driver import DriverOptions

log = logging.getLogger(__name__)

DEFAULT_DRAIN_TIMEOUT_S = 30.0  # the agent's --drain-timeout-s
DRAIN_POLL_S = 0.05  # how often a drain looks whether its engine's last request has ended


@dataclass(frozen=True)
class EngineSpec:
    name: str
    path: str
    tp_size: int = 1
    load_format: str = "auto"
    engine: str = "auto"  # "torch" | "sglang" | "auto" (resolved by the manager at load)
    dtype: str = "auto"
    seed: int = 0
    slo: ModelSlo = ModelSlo()
    max_context: int = 0  # SGLang's --context-length; 0: the model's own
    deterministic_inference: bool = False  # SGLang's --enable-deterministic-inference
    prefix_caching: bool = True  # the built-in engine's (prefix_cache.py)


class ModelNotLoadedError(LookupError):
    pass


class EngineNotReadyError(RuntimeError):
    """The engine exists but cannot serve now (still loading, or failed)."""


class DrainingError(EngineNotReadyError):
    """A request that had not gone into the engine yet when its drain began:
    sent back, so the gateway can give it to another replica."""


def auto_engine(device_kind: str, sglang_version: str, stand_in: bool = False) -> tuple[str, str]:
    """What `engine: auto` runs on a device, and why: SGLang on a CUDA GPU where a release the driver was
    verified with is installed (or a launch command stands in for it), the built-in engine otherwise
    (an unverified SGLang is run only when asked for by name, engine: sglang)."""
    if device_kind != "cuda":
        return "torch", f"the built-in engine on a {device_kind} device"
    if stand_in:
        return "sglang", "the agent's SGLang launch command"
    if not sglang_version:
        return "torch", "SGLang is not installed"
    if sglang_version not in SGLANG_VERIFIED:
        return "torch", (
            f"SGLang {sglang_version} is installed, but the driver was verified with "
            f"{', '.join(SGLANG_VERIFIED)}; engine: sglang runs it anyway"
        )
    return "sglang", f"SGLang {sglang_version}, a verified release"


class PlacementError(ValueError):
    """A load request this agent cannot satisfy (unknown GPU, wrong tp size, ...)."""


@dataclass
class ManagedEngine:
    spec: EngineSpec
    gpu_ids: tuple[int, ...]
    state: str = "loading"  # loading | active | inactive | failed | unloaded
    error: str = ""
    engine: EngineHandle | None = None
    memory_limit_bytes: int = 0
    limit_revision: int = 0
    cap_bytes: int = 0  # the most KV memory the coordinator may give it (0: no cap)
    shared_weights: SharedWeightsFile | None = None  # its worker's host weights, named at load
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    activation_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    request_stats: ModelRequestStats = None  # type: ignore[assignment]  # set from the spec's SLO
    # Being unloaded: serves what it has, then goes (EngineManager.drain). Its
    # `state` stays what it was (active or inactive) for everything on this
    # agent; only what is published says draining.
    draining: bool = False
    drain_task: asyncio.Task | None = None
    drain_deadline: float = 0.0  # time.monotonic() by which a drain unloads it anyway
    drain_why: str = ""  # what the requests left at that deadline are told
    # Why it was unloaded while requests were still in flight (a drain that
    # timed out): those requests end with this message.
    unload_reason: str = ""
    # Why the memory coordinator switched it off while it served (relieve_kv_pressure): the requests
    # that switch-off ended are told this. Cleared when it is switched on again.
    switched_off_why: str = ""

    def __post_init__(self) -> None:
        if self.request_stats is None:
            self.request_stats = ModelRequestStats(self.spec.slo)

    @property
    def slo(self) -> ModelSlo:
        return self.spec.slo

    @property
    def started_engine(self) -> EngineHandle:
        """The engine, for callers that hold one past its start: `engine` is set once, when the engine has
        started, and never cleared, so what EngineManager.ready() returns has it, as do the engines the
        memory coordinator and admission pick (they skip those whose `engine` is None)."""
        assert self.engine is not None, f"the engine of {self.spec.name!r} has not started"
        return self.engine

    @property
    def fixed_kv(self) -> bool:
        """A built-in engine split over several GPUs: its KV reservation is fixed at
        load (every rank allocates its page pool whole), never ballooned."""
        return len(self.gpu_ids) > 1 and self.spec.engine == "torch"

    @property
    def published_state(self) -> str:
        """The state others see (etcd, GetStatus): draining while it drains."""
        return "draining" if self.draining and self.state in ("active", "inactive") else self.state


OnChange = Callable[[ManagedEngine], Awaitable[None]]


class ModelLoadArgs(TypedDict):
    """What every rank of a split model is loaded with (RemoteEngine.load and load_shard_follower)."""

    name: str
    load_format: str
    dtype: str
    seed: int


# A coordinated engine starts with no KV memory; the device's memory
# coordinator sets its limit as soon as it is loaded (and admission grants
# more before any request goes in).
COORDINATED_INITIAL_LIMIT_BYTES = 1


class EngineManager:
    def __init__(
        self,
        devices: list[Device],
        on_change: OnChange,
        pool: WorkerPool | None = None,
        coordinated: bool = False,
        stats_window_s: float = DEFAULT_WINDOW_S,
        shared_weights_dir: Path | None = None,
        shared_weights_prefix: str = "prism",
        drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S,
        sglang_launch_command: tuple[str, ...] | None = None,
        sglang_options: DriverOptions | None = None,
    ):
        """pool: run each engine in a worker process from it; None runs engines inline.
        coordinated: a memory coordinator sets the KV limits; a load's memory
        limit is then the engine's cap, not its limit (but a split built-in
        engine's fixed reservation, 0: the engine's default; fixed_kv).
        shared_weights_dir: workers keep each model's host weights in a shared-memory
        file there (named with shared_weights_prefix, removed when the model is
        unloaded), so a worker that replaces a dead one maps them instead of
        loading the model again; None: each worker has a private copy.
        drain_timeout_s: the longest a drain (a graceful unload) waits for its
        engine's requests before unloading it anyway.
        sglang_launch_command: replaces `python -m sglang.launch_server` for
        engine "sglang" (another interpreter; tests give a stand-in);
        sglang_options: the driver's DriverOptions (timeouts, log folder)."""
        if drain_timeout_s < 0:
            raise ValueError("drain_timeout_s must not be negative")
        self.drain_timeout_s = drain_timeout_s
        self.sglang_launch_command = sglang_launch_command
        self.sglang_options = sglang_options
        self.devices = {d.index: d for d in devices}
        # One engine starts on a GPU at a time: a start builds the weights and warms up on the device
        # before an inactive engine gives them back, so concurrent starts of a fleet larger than the GPU
        # ran it out of memory (12 models, 100 GB of weights, on an 80 GB H100: 4 of 12 loads failed).
        self._start_locks = {d.index: asyncio.Lock() for d in devices if d.kind == "cuda"}
        self.engines: dict[str, ManagedEngine] = {}
        self._on_change = on_change
        self.pool = pool
        self.coordinated = coordinated
        self.stats_window_s = stats_window_s  # of each model's request stats (its arrival rate in load reports)
        # Awaited before an engine's weights come back, so the others make room
        # (the memory coordinator's rebalance); None: nothing to wait for.
        self.before_activate: Callable[[ManagedEngine], Awaitable[None]] | None = None
        # Each device's step board: an engine fits its step costs from the steps that ran alone there.
        self.step_boards = DeviceBoards([d.index for d in devices])
        self.shared_weights_dir = shared_weights_dir if pool is not None else None
        self.shared_weights_prefix = shared_weights_prefix
        if self.shared_weights_dir is not None:
            stale = remove_shared_weights(self.shared_weights_dir, shared_weights_prefix)
            if stale:
                log.warning(
                    "removed %d shared weight copies an earlier run of this agent left in %s",
                    stale,
                    self.shared_weights_dir,
                )

    async def _publish(self, managed: ManagedEngine) -> None:
        try:
            await self._on_change(managed)
        except Exception:  # etcd trouble must not break serving; the next change republishes
            log.exception("publishing engine state of %s failed", managed.spec.name)

    def get(self, model: str) -> ManagedEngine:
        managed = self.engines.get(model)
        if managed is None:
            raise ModelNotLoadedError(f"model {model!r} is not loaded on this agent")
        return managed

    def _torch_device(self, gpu_ids: tuple[int, ...]) -> str:
        """The device of the engine itself: rank 0's where the model is split (_start_split_engine)."""
        return self.devices[gpu_ids[0]].torch_device

    async def load(
        self, spec: EngineSpec, gpu_ids: tuple[int, ...], activate: bool, memory_limit_bytes: int
    ) -> ManagedEngine:
        """Loads (or finds) the model's engine; returns when it is ready or failed."""
        unknown = [g for g in gpu_ids if g not in self.devices]
        if not gpu_ids or unknown:
            raise PlacementError(f"gpu_ids {list(gpu_ids)} not on this agent (it has {sorted(self.devices)})")
        if len(gpu_ids) != spec.tp_size:
            raise PlacementError(f"tp_size {spec.tp_size} needs {spec.tp_size} GPU(s), got {list(gpu_ids)}")
        spec = replace(spec, engine=self._engine_kind(spec, gpu_ids))
        if spec.tp_size > 1 and spec.engine == "torch" and self.pool is None:
            raise PlacementError(
                "tensor parallelism (tp_size > 1) with the built-in engine needs engine workers "
                "(one process per GPU): the agent runs its engines inline"
            )
        existing = self.engines.get(spec.name)
        if existing is not None and existing.state == "failed" and existing.engine is not None:
            await existing.engine.stop()  # what is left of it (a dead worker's channel)
        if existing is not None and existing.state != "failed":
            if existing.spec != spec or existing.gpu_ids != gpu_ids:
                raise PlacementError(f"model {spec.name!r} is already loaded here with another spec; unload it first")
            if existing.draining:  # placed here again before it was gone: it stays
                await self._cancel_drain(existing)
            await existing.loaded.wait()
            if activate and existing.state == "inactive":
                await self.activate(spec.name)
            return existing
        managed = ManagedEngine(
            spec=spec,
            gpu_ids=gpu_ids,
            memory_limit_bytes=memory_limit_bytes,
            request_stats=ModelRequestStats(spec.slo, self.stats_window_s),
        )
        if self.coordinated and not managed.fixed_kv:  # the coordinator sets the limit; the load's is its cap
            managed.memory_limit_bytes, managed.cap_bytes = COORDINATED_INITIAL_LIMIT_BYTES, memory_limit_bytes
        self.engines[spec.name] = managed
        await self._publish(managed)
        no_room: CapacityError | None = None
        try:
            async with contextlib.AsyncExitStack() as starting:
                for gpu in sorted(g for g in gpu_ids if g in self._start_locks):
                    await starting.enter_async_context(self._start_locks[gpu])
                engine = await self._start_engine(managed)
                managed.engine = engine
                if not activate:  # its weights leave the GPU before the next start there
                    await engine.deactivate()
            if activate and self.before_activate is not None:
                no_room = await self._prepare_loaded_activation(managed, self.before_activate)
                activate = no_room is None
        except Exception as exc:
            log.exception("loading %s failed", spec.name)
            managed.state, managed.error = "failed", f"{type(exc).__name__}: {exc}"
        else:
            managed.state = "active" if activate else "inactive"
            managed.memory_limit_bytes = engine.stats().memory_limit_bytes
        managed.loaded.set()
        if self.engines.get(spec.name) is not managed:  # unloaded while loading
            if managed.engine is not None:
                await managed.engine.stop()
            self._remove_shared_weights(managed)
            return managed
        await self._publish(managed)
        if no_room is not None and managed.state == "inactive":
            raise CapacityError(f"model {spec.name!r} is loaded but stays switched off: {no_room}")
        return managed

    async def _prepare_loaded_activation(
        self, managed: ManagedEngine, before_activate: Callable[[ManagedEngine], Awaitable[None]]
    ) -> CapacityError | None:
        """An engine loaded active gets what an activation gets (before_activate):
        idle engines step aside and the KV limits make room. Its weights are on
        the device already, so what this decides is whether each engine there
        can still get its least KV limit; if not, it is switched off and stays
        loaded, and the error says why. Under the activation lock, as inactive
        meanwhile, so a request's activation waits for the outcome."""
        async with managed.activation_lock:
            managed.state = "inactive"
            try:
                await before_activate(managed)
            except CapacityError as exc:
                await managed.started_engine.deactivate()
                return exc
            managed.state = "active"
        return None

    def _kv_capacity_bytes(self, gpu_ids: tuple[int, ...]) -> int | None:
        # The limit may later grow to the whole device (the memory coordinator decides);
        # on the CPU the reservation is virtual until used, on CUDA kvcached's is.
        device = self.devices[gpu_ids[0]]
        return device.memory_bytes if device.kind == "cpu" else None

    def _engine_kind(self, spec: EngineSpec, gpu_ids: tuple[int, ...]) -> str:
        """ "torch" or "sglang": auto is SGLang on a CUDA GPU where a verified release is installed
        (auto_engine), and says which it chose."""
        sglang_here = self.sglang_launch_command is not None or importlib.util.find_spec("sglang") is not None
        if spec.engine == "auto":
            kind, why = auto_engine(
                self.devices[gpu_ids[0]].kind,
                installed_version("sglang") if sglang_here else "",
                stand_in=self.sglang_launch_command is not None,
            )
            log.info("%s: engine auto is %s (%s)", spec.name, kind, why)
            return kind
        if spec.engine == "sglang" and not sglang_here:
            raise PlacementError(
                "engine 'sglang' needs the sglang package on this agent (pip install '.[sglang]'); or use engine: torch"
            )
        if spec.engine not in ("torch", "sglang"):
            raise PlacementError(f"engine {spec.engine!r} is not one of auto, torch, sglang")
        return spec.engine

    async def _start_sglang(self, managed: ManagedEngine) -> EngineHandle:
        # Imported here: the driver's HTTP client comes with the sglang extra.
        from services.gpu_agent.sglang import SGLangEngine, SGLangLaunchConfig

        spec = managed.spec
        config = SGLangLaunchConfig(
            name=spec.name,
            model_path=spec.path,
            gpu_ids=managed.gpu_ids,
            tp_size=spec.tp_size,
            load_format=spec.load_format,
            dtype=spec.dtype,
            seed=spec.seed,
            max_context=spec.max_context,
            deterministic_inference=spec.deterministic_inference,
            launch_command=self.sglang_launch_command,
        )
        engine = await SGLangEngine.start(
            config, memory_limit_bytes=managed.memory_limit_bytes, options=self.sglang_options
        )

        async def lost(error: WorkerLostError) -> None:
            await self._engine_lost(managed, error)

        engine.on_lost(lost)
        return engine

    async def _start_engine(self, managed: ManagedEngine) -> EngineHandle:
        spec, gpu_ids = managed.spec, managed.gpu_ids
        if spec.engine == "sglang":
            return await self._start_sglang(managed)
        # The built-in engine honours seeds always (deterministic_inference is SGLang's switch for that).
        if self.pool is None:
            return InlineEngine(
                await asyncio.to_thread(
                    self._build_engine,
                    spec,
                    gpu_ids,
                    managed.memory_limit_bytes,
                    self.step_boards.slot_for(gpu_ids[0], spec.name),
                )
            )
        if spec.tp_size > 1:
            return await self._start_split_engine(managed, self.pool)
        start = time.perf_counter()
        worker = await self.pool.acquire(self._torch_device(gpu_ids))
        try:
            shared = managed.shared_weights = self._shared_weights_of(managed)
            engine = await RemoteEngine.load(
                worker,
                spec.path,
                name=spec.name,
                load_format=spec.load_format,
                dtype=spec.dtype,
                seed=spec.seed,
                memory_limit_bytes=managed.memory_limit_bytes,
                kv_capacity_bytes=self._kv_capacity_bytes(gpu_ids) or 0,
                shared_weights_path=str(shared.path) if shared is not None else "",
                max_context=spec.max_context,
                step_board=self.step_boards.slot_for(gpu_ids[0], spec.name),
                prefix_caching=spec.prefix_caching,
            )
        except BaseException:
            await worker.terminate()  # a worker that failed a load is not reused
            raise

        async def lost(error: WorkerLostError) -> None:
            await self._engine_lost(managed, error)

        engine.on_lost(lost)
        log.info(
            "loaded %s in engine worker %d on %s in %.2fs (%d MB of weights%s)",
            spec.name,
            worker.pid,
            engine.device,
            time.perf_counter() - start,
            engine.weight_bytes >> 20,
            ", mapped from the shared host copy" if engine.weights_attached else "",
        )
        return engine

    async def _start_split_engine(self, managed: ManagedEngine, pool: WorkerPool) -> EngineHandle:
        """tp_size > 1: one engine worker per GPU, all loading at once (they meet at a
        rendezvous); rank 0's worker runs the engine and takes the requests, the
        others follow its steps (shard_follower.py) and end with it."""
        spec, gpu_ids = managed.spec, managed.gpu_ids
        start = time.perf_counter()
        workers = []
        try:
            # All at once: with no spare worker, each starts (imports, CUDA, warm-up) in 5-10 s.
            acquired = await asyncio.gather(
                *(pool.acquire(self.devices[gpu].torch_device) for gpu in gpu_ids), return_exceptions=True
            )
            workers = [w for w in acquired if not isinstance(w, BaseException)]
            failed = next((w for w in acquired if isinstance(w, BaseException)), None)
            if failed is not None:
                raise failed
            rendezvous = f"tcp://127.0.0.1:{free_port()}"
            ranks = [
                wpb.TensorParallelSpec(rank=r, size=len(gpu_ids), rendezvous=rendezvous) for r in range(len(gpu_ids))
            ]
            common = ModelLoadArgs(name=spec.name, load_format=spec.load_format, dtype=spec.dtype, seed=spec.seed)
            engine, *_ = await asyncio.gather(
                RemoteEngine.load(
                    workers[0],
                    spec.path,
                    memory_limit_bytes=managed.memory_limit_bytes,
                    kv_capacity_bytes=self._kv_capacity_bytes(gpu_ids) or 0,
                    max_context=spec.max_context,
                    tensor_parallel=ranks[0],
                    prefix_caching=spec.prefix_caching,
                    **common,
                ),
                *(
                    RemoteEngine.load_shard_follower(w, spec.path, tensor_parallel=ranks[r], **common)
                    for r, w in enumerate(workers[1:], 1)
                ),
            )
        except BaseException:
            for worker in workers:  # a rank that failed leaves the others waiting at the rendezvous
                await worker.terminate()
            raise
        engine.add_followers(workers[1:])

        async def lost(error: WorkerLostError) -> None:
            await self._engine_lost(managed, error)

        engine.on_lost(lost)
        log.info(
            "loaded %s split over %d workers on %s in %.2fs (%d MB of weights a rank)",
            spec.name,
            len(workers),
            ", ".join(w.device for w in workers),
            time.perf_counter() - start,
            engine.weight_bytes >> 20,
        )
        return engine

    def _shared_weights_of(self, managed: ManagedEngine) -> SharedWeightsFile | None:
        if self.shared_weights_dir is None:
            return None
        spec = managed.spec
        device_kind = self.devices[managed.gpu_ids[0]].kind
        name = shared_weights_name(
            self.shared_weights_prefix, spec.path, spec.load_format, spec.dtype, spec.seed, device_kind
        )
        return SharedWeightsFile(self.shared_weights_dir / name)

    def _remove_shared_weights(self, managed: ManagedEngine) -> None:
        """Unlinks the model's shared host copy once no engine here uses it (a
        failed engine's copy stays for its replacement until it is unloaded).
        The name is the one given at load: naming reads the checkpoint's files,
        which may have changed since."""
        shared = managed.shared_weights
        if shared is not None and all(m.shared_weights != shared for m in self.engines.values()):
            shared.remove()

    async def _engine_lost(self, managed: ManagedEngine, error: WorkerLostError) -> None:
        """The engine's worker process died: the engine has failed (a new LoadModel starts a fresh one)."""
        await managed.loaded.wait()
        if self.engines.get(managed.spec.name) is not managed or managed.state in ("failed", "unloaded"):
            return
        managed.state, managed.error = "failed", str(error)
        log.error("engine of %s failed: %s", managed.spec.name, error)
        await self._publish(managed)

    def _build_engine(
        self,
        spec: EngineSpec,
        gpu_ids: tuple[int, ...],
        memory_limit_bytes: int,
        step_board: tuple[str, int] | None = None,
    ) -> Engine:
        start = time.perf_counter()
        engine = Engine(
            spec.path,
            name=spec.name,
            load_format=spec.load_format,
            dtype=spec.dtype,
            device=self._torch_device(gpu_ids),
            seed=spec.seed,
            memory_limit_bytes=memory_limit_bytes or None,
            kv_capacity_bytes=self._kv_capacity_bytes(gpu_ids),
            max_context=spec.max_context or None,
            step_board=step_board,
            prefix_caching=spec.prefix_caching,
        )
        engine.start()
        log.info(
            "loaded %s on %s in %.2fs (%d MB of weights)",
            spec.name,
            engine.device,
            time.perf_counter() - start,
            engine.weight_bytes >> 20,
        )
        return engine

    async def unload(self, model: str) -> ManagedEngine:
        """Unloads the engine at once: requests in flight on it end with an error
        that says so (UNAVAILABLE, not an engine failure)."""
        managed = self.get(model)
        left = managed.request_stats.in_flight
        if left and not managed.unload_reason:
            managed.unload_reason = (
                f"model {model!r} was unloaded from this agent while the request was in flight "
                f"(unloaded at once, with {left} request(s) unfinished)"
            )
        return await self._unload(managed)

    async def _unload(self, managed: ManagedEngine) -> ManagedEngine:
        if managed.drain_task is not None and managed.drain_task is not asyncio.current_task():
            managed.drain_task.cancel()
        managed.drain_task = None
        del self.engines[managed.spec.name]
        if managed.engine is not None:
            await managed.engine.stop()
        self.step_boards.release(managed.spec.name)
        self._remove_shared_weights(managed)
        managed.state = "unloaded"
        await self._publish(managed)
        return managed

    async def drain(self, model: str, timeout_s: float | None = None, why: str | None = None) -> ManagedEngine:
        """Unloads the engine gracefully: at once if no request is in flight on
        it (or it is loading or failed), else it is published as draining and
        unloaded by a background task once its requests have ended, at the
        latest after timeout_s (default: the manager's drain_timeout_s), when
        the ones left end with an error saying so (`why`, default: the drain
        timeout passed). Returns at once; a drain under way is left to run,
        ending by the earlier of its deadline and this one when `why` is
        given. load() of the same spec cancels it."""
        managed = self.get(model)
        timeout_s = self.drain_timeout_s if timeout_s is None else timeout_s
        if managed.draining:
            if why is not None and time.monotonic() + timeout_s < managed.drain_deadline:
                managed.drain_deadline, managed.drain_why = time.monotonic() + timeout_s, why
            return managed
        if managed.state not in ("active", "inactive") or managed.request_stats.in_flight == 0:
            return await self._unload(managed)
        managed.draining = True
        managed.drain_deadline = time.monotonic() + timeout_s
        managed.drain_why = why or f"its drain timeout of {timeout_s:g}s passed"
        log.info(
            "draining %s: %d request(s) in flight, unloading once they end (at most %.0fs)",
            model,
            managed.request_stats.in_flight,
            timeout_s,
        )
        await self._publish(managed)
        managed.drain_task = asyncio.create_task(self._drain(managed), name=f"drain-{model}")
        return managed

    async def drain_all(self, timeout_s: float, why: str) -> None:
        """Drains every engine (a shutdown) and returns once all are gone: each
        within timeout_s, a drain already under way too; the requests still in
        flight then end with an error that gives `why`."""
        for model in list(self.engines):
            if model in self.engines:
                await self.drain(model, timeout_s, why)
        drains = [m.drain_task for m in self.engines.values() if m.drain_task is not None]
        await asyncio.gather(*drains, return_exceptions=True)

    async def _drain(self, managed: ManagedEngine) -> None:
        model = managed.spec.name
        start = time.monotonic()
        while managed.request_stats.in_flight > 0 and time.monotonic() < managed.drain_deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        if self.engines.get(model) is not managed or not managed.draining:
            return  # unloaded at once meanwhile, or placed here again
        left = managed.request_stats.in_flight
        if left:
            managed.unload_reason = (
                f"model {model!r} was unloaded from this agent while the request was in flight: "
                f"{managed.drain_why} with {left} request(s) unfinished"
            )
            log.warning(
                "drain of %s ended after %.1fs with %d request(s) in flight (%s): unloading it",
                model,
                time.monotonic() - start,
                left,
                managed.drain_why,
            )
        else:
            log.info("drained %s in %.2fs; unloading it", model, time.monotonic() - start)
        try:
            await self._unload(managed)
        except Exception:
            log.exception("unloading %s after its drain failed", model)

    async def _cancel_drain(self, managed: ManagedEngine) -> None:
        if managed.drain_task is not None:
            managed.drain_task.cancel()
        managed.drain_task = None
        managed.draining = False
        log.info("%s is placed here again: its drain is cancelled", managed.spec.name)
        await self._publish(managed)

    async def activate(self, model: str) -> ManagedEngine:
        managed = self.ready(model)
        async with managed.activation_lock:
            if managed.state == "inactive":
                if self.before_activate is not None:
                    await self.before_activate(managed)
                start = time.perf_counter()
                await managed.started_engine.activate()
                managed.state = "active"
                managed.switched_off_why = ""
                log.info("activated %s in %.3fs", model, time.perf_counter() - start)
                await self._publish(managed)
        return managed

    async def deactivate(self, model: str) -> ManagedEngine:
        managed = self.ready(model)
        async with managed.activation_lock:
            if managed.state == "active":
                await managed.started_engine.deactivate()
                managed.state = "inactive"
                await self._publish(managed)
        return managed

    async def set_memory_limit(self, model: str, nbytes: int, revision: int) -> ManagedEngine:
        """revision 0: the engine's next revision; otherwise a stale revision is ignored."""
        managed = self.ready(model)
        state = await managed.started_engine.set_memory_limit(nbytes, revision or None)
        managed.memory_limit_bytes = state.limit_bytes
        managed.limit_revision = state.revision
        return managed

    def ready(self, model: str) -> ManagedEngine:
        """The model's engine if it is loaded and healthy (active or not)."""
        managed = self.get(model)
        if managed.state == "loading":
            raise EngineNotReadyError(f"model {model!r} is still loading on this agent")
        if managed.state == "failed" or managed.engine is None:
            raise EngineNotReadyError(f"model {model!r} failed to load on this agent: {managed.error}")
        return managed

    async def stop_all(self) -> None:
        for model in list(self.engines):
            await self.unload(model)
