"""The SGLang server process: started in its own session (so it leads a
process group that takes along the scheduler and detokenizer processes it
spawns), its output in a log file read back when it fails, and ended with
SIGTERM to the whole group, then SIGKILL after a timeout."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

_TAIL_READ_BYTES = 64 * 1024
_GROUP_POLL_S = 0.05


class ServerProcess:
    def __init__(self, proc: asyncio.subprocess.Process, log_path: Path, argv: Sequence[str]):
        self._proc = proc
        self.pid = proc.pid
        self.pgid = proc.pid  # start_new_session: the server leads its own group
        self.log_path = log_path
        self.argv = list(argv)
        self.exited = asyncio.Event()
        self._waiter = asyncio.create_task(self._wait(), name=f"sglang-exit-{proc.pid}")

    @classmethod
    async def start(
        cls, argv: Sequence[str], env: Mapping[str, str], log_path: Path, cwd: str | None = None
    ) -> ServerProcess:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log_file:  # the child keeps its own descriptor
            log_file.write(f"---- prism: starting {' '.join(argv)}\n".encode())
            log_file.flush()
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    env=dict(env),
                    cwd=cwd,
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                raise OSError(f"cannot start {argv[0]!r}: {exc}") from exc
        log.info("started SGLang server pid %d: %s (log %s)", proc.pid, " ".join(argv), log_path)
        return cls(proc, log_path, argv)

    async def _wait(self) -> None:
        await self._proc.wait()
        self.exited.set()

    @property
    def alive(self) -> bool:
        return self._proc.returncode is None

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def exit_description(self) -> str:
        code = self._proc.returncode
        if code is None:
            return "still running"
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - _TAIL_READ_BYTES))
                text = f.read().decode("utf-8", "replace")
        except OSError as exc:
            return f"(log {self.log_path} unreadable: {exc})"
        return "\n".join(text.splitlines()[-lines:])

    async def wait_exit(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self.exited.wait(), timeout_s)
            return True
        except TimeoutError:
            return False

    def group_alive(self) -> bool:
        try:
            os.killpg(self.pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:  # a member we cannot signal: still there
            return True

    def _signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self._signal_group(signal.SIGKILL)

    async def terminate(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the group; whatever of it is left after timeout_s gets
        SIGKILL. Returns once the leader has been reaped and no member of the
        group remains (or, should one survive SIGKILL, after a further
        timeout_s, logging it)."""
        if self.alive or self.group_alive():
            self._signal_group(signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            await self.wait_exit(timeout_s)
            while self.group_alive() and time.monotonic() < deadline:
                await asyncio.sleep(_GROUP_POLL_S)
            if self.alive or self.group_alive():
                log.warning(
                    "SGLang server pid %d did not end within %.0fs of SIGTERM; killing its process group",
                    self.pid,
                    timeout_s,
                )
                self.kill()
        await self.wait_exit(timeout_s)
        deadline = time.monotonic() + timeout_s
        while self.group_alive() and time.monotonic() < deadline:
            await asyncio.sleep(_GROUP_POLL_S)
        if self.alive or self.group_alive():
            log.error("SGLang server process group %d survived SIGKILL for %.0fs", self.pgid, timeout_s)
