"""CUDA MPS for the agent's engine processes.

Engines run in processes of their own (workers/); without MPS, processes on
one GPU time-slice it: a kernel of one never runs beside a kernel of
another. Through MPS their kernels share the GPU's SMs at once. Measured on
an H100 (bench/results/colocated_steps-6engines-h100{,-mps}.json, six engines of
1B-8B busy at once): a 1B prompt of 1536 tokens took 98 ms beside the others
time-sliced and 25 ms through MPS; an 8B decode step 26 against 20.5 ms.

The cost is fault containment: a fatal GPU fault in one MPS client (an
illegal address, not an out-of-memory) ends every client on that GPU, where
time-sliced processes only lose their own. Out-of-memory stays per process.

`start_mps` starts a control daemon of the agent's own (its pipe and log
directories in a fresh temporary folder) and exports the directories, so
the workers the agent starts afterwards, which inherit its environment,
connect to it; `MpsDaemon.stop` quits it once they are gone. A daemon the
operator runs already (CUDA_MPS_PIPE_DIRECTORY set, its control pipe there)
is used as it is, and left running.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CONTROL_BINARY = "nvidia-cuda-mps-control"
PIPE_ENV = "CUDA_MPS_PIPE_DIRECTORY"
LOG_ENV = "CUDA_MPS_LOG_DIRECTORY"
CHOICES = ("auto", "on", "off")
QUIT_TIMEOUT_S = 10.0


class MpsError(RuntimeError):
    """MPS was asked for (--cuda-mps on) and cannot be had."""


@dataclass
class MpsDaemon:
    pipe_dir: Path
    owned: bool  # started by this agent, so quit by it
    control_binary: str = CONTROL_BINARY

    def stop(self) -> None:
        """Quits a daemon this agent started (its server goes with it); call
        once no engine process of the agent runs."""
        if not self.owned:
            return
        try:
            subprocess.run(
                [self.control_binary],
                input=b"quit\n",
                env=_env_for(self.pipe_dir),
                capture_output=True,
                timeout=QUIT_TIMEOUT_S,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("CUDA MPS daemon (pipe %s) did not quit: %s", self.pipe_dir, exc)
        else:
            log.info("CUDA MPS daemon (pipe %s) quit", self.pipe_dir)
        self.owned = False


def _env_for(pipe_dir: Path) -> dict[str, str]:
    return os.environ | {PIPE_ENV: str(pipe_dir), LOG_ENV: str(pipe_dir.parent / "log")}


def start_mps(choice: str, control_binary: str = CONTROL_BINARY) -> MpsDaemon | None:
    """choice "off": None. "auto": a daemon if the control binary is found,
    else None (logged). "on": a daemon, or MpsError saying why not. Exports
    the pipe and log directories into this process's environment."""
    if choice not in CHOICES:
        raise ValueError(f"--cuda-mps must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "off":
        return None
    existing = os.environ.get(PIPE_ENV)
    if existing and (Path(existing) / "control").exists():
        log.info("CUDA MPS: the daemon already running at %s serves the engines", existing)
        return MpsDaemon(Path(existing), owned=False, control_binary=control_binary)
    binary = shutil.which(control_binary)
    if binary is None:
        if choice == "on":
            raise MpsError(f"--cuda-mps on: {control_binary} is not on PATH (it comes with the NVIDIA driver)")
        log.info("CUDA MPS: %s not found; engine processes time-slice each GPU", control_binary)
        return None
    root = Path(tempfile.mkdtemp(prefix="prism-mps-"))
    pipe_dir = root / "pipe"
    pipe_dir.mkdir()
    (root / "log").mkdir()
    env = _env_for(pipe_dir)
    done = subprocess.run([binary, "-d"], env=env, capture_output=True, timeout=QUIT_TIMEOUT_S, check=False)
    if done.returncode != 0:
        why = (done.stderr or done.stdout).decode(errors="replace").strip() or f"exit code {done.returncode}"
        if choice == "on":
            raise MpsError(f"--cuda-mps on: {binary} -d failed: {why}")
        log.warning("CUDA MPS: %s -d failed (%s); engine processes time-slice each GPU", binary, why)
        return None
    os.environ[PIPE_ENV], os.environ[LOG_ENV] = env[PIPE_ENV], env[LOG_ENV]
    log.info("CUDA MPS: daemon started (pipe %s); engine processes share each GPU through it", pipe_dir)
    return MpsDaemon(pipe_dir, owned=True, control_binary=binary)
