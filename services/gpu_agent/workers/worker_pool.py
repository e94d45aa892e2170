"""Pre-started, device-initialized engine workers per device (warm start).

`start()` launches `spares_per_device` workers for each device; they import
torch and warm their device up while no model is asked for. `acquire(device)`
hands out a spare (waiting for it if it is still warming up) and starts its
replacement in the background, so the next load is warm too; with no spares
configured it starts a fresh worker and waits for it (a cold start).

Every worker, handed out or not, is the pool's to end: `close()` stops them
all (SIGTERM, then SIGKILL) and removes their sockets' private directory.
And none outlives the agent: each holds the read end of a pipe whose only
writer is this process, and exits when it reads EOF."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from services.gpu_agent.workers.worker_process import WorkerProcess

log = logging.getLogger(__name__)


class WorkerPool:
    def __init__(
        self,
        devices: Sequence[str],
        spares_per_device: int = 1,
        *,
        ready_timeout_s: float = 600.0,
        stop_timeout_s: float = 10.0,
    ):
        """devices: torch device strings ("cuda:0", "cpu")."""
        if spares_per_device < 0:
            raise ValueError(f"spares_per_device must be >= 0, got {spares_per_device}")
        self.devices = list(dict.fromkeys(devices))
        self.spares_per_device = spares_per_device
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        # Short: a unix socket path must fit in 108 bytes.
        self.socket_dir = Path(tempfile.mkdtemp(prefix="prism-w-"))
        self._parent_read, self._parent_write = os.pipe()
        self._spares: dict[str, list[WorkerProcess]] = {d: [] for d in self.devices}
        self._workers: set[WorkerProcess] = set()  # every live worker, spare or handed out
        self._refills: set[asyncio.Task] = set()
        self._refill_locks = {d: asyncio.Lock() for d in self.devices}  # one top-up at a time per device
        self._names = itertools.count()
        self._closed = False

    async def start(self) -> None:
        """Launches the spares; returns without waiting for their warm-up."""
        for device in self.devices:
            await self._refill(device)

    def spares(self, device: str) -> list[WorkerProcess]:
        return list(self._spares[self._known(device)])

    @property
    def workers(self) -> list[WorkerProcess]:
        return list(self._workers)

    async def wait_spares_ready(self) -> None:
        await asyncio.gather(*(w.wait_ready() for spares in self._spares.values() for w in spares))

    async def acquire(self, device: str) -> WorkerProcess:
        """A ready worker for the device, now the caller's (it holds no model)."""
        if self._closed:
            raise RuntimeError("the worker pool is closed")
        spares = self._spares[self._known(device)]
        spares[:] = [w for w in spares if w.alive]  # a spare that crashed is not handed out
        if spares:
            worker = next((w for w in spares if w.ready), spares[0])
            spares.remove(worker)
            log.info("warm start on %s: engine worker %d", device, worker.pid)
        else:
            worker = await self._spawn(device)
            log.info("cold start on %s: engine worker %d", device, worker.pid)
        self._schedule_refill(device)
        try:
            await worker.wait_ready()
        except BaseException:
            await worker.terminate(self.stop_timeout_s)  # timed out (or cancelled): it is nobody's now
            raise
        return worker

    def _known(self, device: str) -> str:
        if device not in self._spares:
            raise ValueError(f"the worker pool has no device {device!r} (it has {self.devices})")
        return device

    def _schedule_refill(self, device: str) -> None:
        task = asyncio.create_task(self._refill(device), name=f"refill-{device}")
        self._refills.add(task)
        task.add_done_callback(self._refills.discard)

    async def _refill(self, device: str) -> None:
        spares = self._spares[device]
        async with self._refill_locks[device]:
            while not self._closed and len([w for w in spares if w.alive]) < self.spares_per_device:
                try:
                    spares.append(await self._spawn(device))
                except OSError as exc:  # cannot fork/exec: the next acquire starts one cold (and says why)
                    log.error("cannot start a spare engine worker for %s: %s", device, exc)
                    return

    async def _spawn(self, device: str) -> WorkerProcess:
        socket_path = self.socket_dir / f"{next(self._names)}.sock"
        worker = await WorkerProcess.spawn(device, socket_path, self._parent_read, self.ready_timeout_s)
        self._workers.add(worker)

        async def forget(w: WorkerProcess) -> None:
            self._workers.discard(w)

        worker.on_exit(forget)
        return worker

    async def close(self) -> None:
        """Ends every worker (SIGTERM, then SIGKILL after stop_timeout_s) and removes the sockets."""
        if self._closed:
            return
        self._closed = True
        if self._refills:
            await asyncio.gather(*self._refills, return_exceptions=True)
        await asyncio.gather(*(w.terminate(self.stop_timeout_s) for w in list(self._workers)))
        for fd in (self._parent_write, self._parent_read):
            os.close(fd)
        shutil.rmtree(self.socket_dir, ignore_errors=True)
        log.info("worker pool closed")
