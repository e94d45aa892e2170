"""The agent's handle on one engine worker process: starting it, knowing
when it is ready (its first Info answer) and when it exits, and ending it.

Readiness is the worker answering Info over its socket, which it binds only
after its device warm-up; the wait races the process's exit, so a worker
that crashes while warming up is reported at once, with its exit status."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import grpc

from prism_client.v1 import engine_worker_pb2 as wpb
from prism_client.v1 import engine_worker_pb2_grpc
from services.gpu_agent.kvcached_env import with_agent_accounting
from services.gpu_agent.workers.errors import EXIT_SPLIT_STEP_FAILED, WorkerStartError

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[3]
WORKER_MODULE = "services.gpu_agent.workers.worker_main"
# The socket appears only after the warm-up; reconnect attempts must be
# frequent or gRPC's default back-off (1 s and growing) delays readiness.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 20),
    ("grpc.min_reconnect_backoff_ms", 20),
    ("grpc.max_reconnect_backoff_ms", 100),
]

OnExit = Callable[["WorkerProcess"], Awaitable[None]]


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    if returncode == EXIT_SPLIT_STEP_FAILED:
        return f"exit code {returncode}: a step of its split model failed, or its other ranks went; its log says why"
    return f"exit code {returncode}"


def worker_env(base: Mapping[str, str], socket_path: Path) -> dict[str, str]:
    """A worker's environment: the agent's, with the project importable and kvcached set for it."""
    env = with_agent_accounting({**base, "PYTHONUNBUFFERED": "1"})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    # kvcached keeps each process's KV memory accounting in a /dev/shm segment
    # named by KVCACHED_IPC_NAME; engines in separate processes on one GPU
    # must not share it (the agent pid and socket name make it unique).
    ipc_base = base.get("KVCACHED_IPC_NAME", "kvcached_mem_info")
    env["KVCACHED_IPC_NAME"] = f"{ipc_base}_prism{os.getpid()}_w{socket_path.stem}"
    return env


class WorkerProcess:
    def __init__(
        self,
        device: str,
        socket_path: Path,
        process: asyncio.subprocess.Process,
        spawned_at: float,
        ready_timeout_s: float,
    ):
        self.device = device
        self.socket_path = socket_path
        self.process = process
        self.pid = process.pid
        self.spawned_at = spawned_at  # perf_counter() just before the spawn
        self.ready_at: float | None = None
        self.info: wpb.WorkerInfo | None = None
        self.channel = grpc.aio.insecure_channel(f"unix:{socket_path}", options=CHANNEL_OPTIONS)
        self.stub = engine_worker_pb2_grpc.EngineWorkerStub(self.channel)
        self.exited = asyncio.Event()
        self._on_exit: list[OnExit] = []
        self._exit_task = asyncio.create_task(self._watch_exit(), name=f"worker-{self.pid}-exit")
        self._ready_task = asyncio.create_task(self._await_ready(ready_timeout_s), name=f"worker-{self.pid}-ready")

    @classmethod
    async def spawn(cls, device: str, socket_path: Path, parent_fd: int, ready_timeout_s: float) -> WorkerProcess:
        env = worker_env(os.environ, socket_path)
        spawned_at = time.perf_counter()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            WORKER_MODULE,
            "--device",
            device,
            "--socket",
            str(socket_path),
            "--parent-fd",
            str(parent_fd),
            pass_fds=(parent_fd,),
            env=env,
            # Its own session: a terminal's Ctrl-C reaches the agent, which stops its workers in order.
            start_new_session=True,
        )
        log.info("started engine worker %d for %s", process.pid, device)
        return cls(device, socket_path, process, spawned_at, ready_timeout_s)

    # ---- state --------------------------------------------------------------

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    @property
    def alive(self) -> bool:
        return not self.exited.is_set()

    @property
    def ready(self) -> bool:
        return self.ready_at is not None

    @property
    def start_s(self) -> float | None:
        """Spawn to ready: process start, imports and the device warm-up."""
        return None if self.ready_at is None else self.ready_at - self.spawned_at

    def exit_description(self) -> str:
        return describe_exit(self.returncode)

    def on_exit(self, callback: OnExit) -> None:
        """callback(worker) runs once, on the loop, when the process has exited."""
        self._on_exit.append(callback)

    def __repr__(self) -> str:
        return f"WorkerProcess(pid={self.pid}, device={self.device!r}, ready={self.ready}, {self.exit_description()})"

    # ---- life -----------------------------------------------------------------

    async def wait_ready(self) -> wpb.WorkerInfo:
        """The worker's Info once it serves; WorkerStartError if it exits or times out first."""
        return await asyncio.shield(self._ready_task)

    async def _await_ready(self, timeout_s: float) -> wpb.WorkerInfo:
        info_call = asyncio.ensure_future(
            self.stub.Info(wpb.WorkerInfoRequest(), wait_for_ready=True, timeout=timeout_s)
        )
        exit_wait = asyncio.ensure_future(self.exited.wait())
        try:
            await asyncio.wait({info_call, exit_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            exit_wait.cancel()
        answered = info_call.done() and not info_call.cancelled() and info_call.exception() is None
        if not answered and self.exited.is_set():  # (closing the channel at exit may have cancelled the call)
            info_call.cancel()
            raise WorkerStartError(
                f"engine worker {self.pid} for {self.device} exited before it was ready "
                f"({self.exit_description()}); see its log lines above"
            )
        try:
            self.info = info_call.result()
        except grpc.aio.AioRpcError as exc:
            raise WorkerStartError(
                f"engine worker {self.pid} for {self.device} did not become ready: {exc.code().name}: {exc.details()}"
            ) from None
        self.ready_at = time.perf_counter()
        log.info(
            "engine worker %d for %s ready in %.2fs (imports %.2fs, device warm-up %.2fs)",
            self.pid,
            self.device,
            self.start_s,
            self.info.import_s,
            self.info.warmup_s,
        )
        return self.info

    async def _watch_exit(self) -> None:
        await self.process.wait()
        self.exited.set()
        log.log(
            logging.INFO if self.returncode == 0 else logging.WARNING,
            "engine worker %d for %s exited (%s)",
            self.pid,
            self.device,
            self.exit_description(),
        )
        for callback in self._on_exit:
            try:
                await callback(self)
            except Exception:  # one failing listener must not keep the others from hearing of the exit
                log.exception("handling the exit of engine worker %d failed", self.pid)
        await self.channel.close()
        try:
            self.socket_path.unlink()
        except FileNotFoundError:
            pass

    async def wait_exited(self) -> None:
        await self.exited.wait()
        await asyncio.shield(self._exit_task)  # its exit listeners have run too

    async def terminate(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (the worker stops its engine and exits), then SIGKILL after timeout_s."""
        if self.alive:
            self._signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.exited.wait(), timeout_s)
            except TimeoutError:
                log.warning("engine worker %d ignored SIGTERM for %.0fs; killing it", self.pid, timeout_s)
                self._signal(signal.SIGKILL)
        await self.wait_exited()
        self._ready_task.cancel()

    def kill(self) -> None:
        """SIGKILL at once: for a worker that no longer answers (SIGTERM would
        wait on the very code that hangs)."""
        if self.alive:
            self._signal(signal.SIGKILL)

    def _signal(self, sig: signal.Signals) -> None:
        try:
            self.process.send_signal(sig)
        except ProcessLookupError:
            pass
