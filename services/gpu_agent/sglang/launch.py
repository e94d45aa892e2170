"""The command line and environment of one SGLang server.

kvcached hooks into SGLang through its import-time autopatch, switched on by
the server's environment: ENABLE_KVCACHED=true and KVCACHED_AUTOPATCH=1.
KVCACHED_IPC_NAME names the shared-memory segment (/dev/shm/<name>) through
which kvcached publishes the instance's KV usage and reads its KV limit; each
engine on a host needs its own, so it is derived from the engine's name and
port unless given. kvcached sanitizes the name to [A-Za-z0-9_-] (at most 64
characters) and uses the result silently, so a name it would change is
refused here: the driver must write the limit to the segment SGLang uses.

The GPUs are chosen with CUDA_VISIBLE_DEVICES (SGLang then counts from its
base GPU 0), so `--tp-size` is the number of GPUs given.

SGLang flags used, each checked against SGLang 0.5.15's ServerArgs
(python/sglang/srt/server_args.py, which derives every flag from its field
name) and parsed by that release's own argument parser: --model-path,
--served-model-name, --host, --port, --tp-size, --load-format, --dtype (one
of SGLang's choices: auto, half, float16, bfloat16, float, float32; our
engine's aliases fp16/bf16/fp32 are translated), --random-seed,
--context-length (only when max_context is set, so that SGLang refuses
exactly what the driver refuses), --mem-fraction-static (only when set; with
kvcached 0.1.6 on SGLang 0.5.11-0.5.15 the pool's virtual capacity, and so
the largest limit, is the GPU's memory times this fraction less what the
process holds, see kvcached/integration/sglang/patches.py), --enable-metrics
(/metrics), --enable-memory-saver and --enable-weights-cpu-backup
(release/resume memory occupation keeps a host copy of the weights, so a
deactivated model comes back without reading its checkpoint),
--incremental-streaming-output (each streamed chunk carries only the new text
and token ids), --enable-deterministic-inference (only when asked for: it is
what makes SGLang honour a request's sampling_seed; without it the seed is
accepted and ignored, see sampling/sampling_batch_info.py)."""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace

from services.gpu_agent.kvcached_env import with_agent_accounting

LAUNCH_MODULE = "sglang.launch_server"
KVCACHED_IPC_NAME_MAX = 64
_IPC_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
# SGLang 0.5.15's --dtype choices, and our built-in engine's other spellings of them.
SGLANG_DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")
_DTYPE_ALIASES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def sglang_dtype(dtype: str) -> str:
    """The --dtype value SGLang accepts for one of ours (ValueError if none)."""
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in SGLANG_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one SGLang takes ({', '.join(SGLANG_DTYPES)}, or fp16/bf16/fp32)")
    return name


@dataclass(frozen=True)
class SGLangLaunchConfig:
    name: str  # the served model name, also the engine's name in the agent
    model_path: str
    gpu_ids: tuple[int, ...] = (0,)
    tp_size: int = 1
    port: int = 0  # 0: a free port is chosen at start (resolve_port)
    host: str = "127.0.0.1"
    load_format: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    mem_fraction_static: float | None = None  # None: SGLang's default (kvcached sizes the KV pool)
    kvcached: bool = True
    ipc_name: str = ""  # "" derives prism_<name>_<port>
    enable_memory_saver: bool = True
    weights_cpu_backup: bool = True  # needs SGLang >= 0.5.3
    incremental_streaming: bool = True
    enable_metrics: bool = True
    # Given to /release_memory_occupation and /resume_memory_occupation; None: every region SGLang manages.
    memory_tags: tuple[str, ...] | None = None
    max_context: int = 0  # 0: the model's (as SGLang derives it); else passed as --context-length
    deterministic_inference: bool = False  # --enable-deterministic-inference: requests' seeds are honoured
    extra_args: tuple[str, ...] = ()
    extra_env: tuple[tuple[str, str], ...] = ()
    python: str = sys.executable
    # Replaces (python, "-m", "sglang.launch_server"); the same arguments follow. Tests put a stand-in here.
    launch_command: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("the engine needs a name")
        if self.tp_size < 1 or len(self.gpu_ids) != self.tp_size:
            raise ValueError(f"tp_size {self.tp_size} needs {self.tp_size} GPU id(s), got {list(self.gpu_ids)}")
        if len(set(self.gpu_ids)) != len(self.gpu_ids) or any(g < 0 for g in self.gpu_ids):
            raise ValueError(f"GPU ids must be distinct and non-negative, got {list(self.gpu_ids)}")
        sglang_dtype(self.dtype)
        if self.max_context < 0:
            raise ValueError(f"max_context must be non-negative, got {self.max_context}")
        if self.mem_fraction_static is not None and not 0 < self.mem_fraction_static <= 1:
            raise ValueError(f"mem_fraction_static must be in (0, 1], got {self.mem_fraction_static}")
        if self.ipc_name and (_IPC_UNSAFE.search(self.ipc_name) or len(self.ipc_name) > KVCACHED_IPC_NAME_MAX):
            raise ValueError(
                f"kvcached IPC name {self.ipc_name!r} must be at most {KVCACHED_IPC_NAME_MAX} characters "
                "of A-Z a-z 0-9 _ - (kvcached would silently use another name)"
            )

    @property
    def kvcached_ipc_name(self) -> str:
        if self.ipc_name:
            return self.ipc_name
        if not self.port:
            raise ValueError("the IPC name is derived from the port: resolve the port first")
        suffix = f"_{self.port}"
        return "prism_" + _IPC_UNSAFE.sub("-", self.name)[: KVCACHED_IPC_NAME_MAX - 6 - len(suffix)] + suffix

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def resolve_port(config: SGLangLaunchConfig) -> SGLangLaunchConfig:
    """The config with a free port if it has none. The port is free when
    chosen; another process could take it before the server binds it, in
    which case the server exits at start-up and the start fails saying so."""
    if config.port:
        return config
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((config.host, 0))
        return replace(config, port=s.getsockname()[1])


def build_command(config: SGLangLaunchConfig) -> list[str]:
    if not config.port:
        raise ValueError("resolve the port before building the command")
    prefix = list(config.launch_command) if config.launch_command else [config.python, "-m", LAUNCH_MODULE]
    args = [
        "--model-path",
        config.model_path,
        "--served-model-name",
        config.name,
        "--host",
        config.host,
        "--port",
        str(config.port),
        "--tp-size",
        str(config.tp_size),
        "--load-format",
        config.load_format,
        "--dtype",
        sglang_dtype(config.dtype),
        "--random-seed",
        str(config.seed),
    ]
    if config.max_context:
        args += ["--context-length", str(config.max_context)]
    if config.mem_fraction_static is not None:
        args += ["--mem-fraction-static", repr(config.mem_fraction_static)]
    if config.enable_metrics:
        args.append("--enable-metrics")
    if config.enable_memory_saver:
        args.append("--enable-memory-saver")
        if config.weights_cpu_backup:
            args.append("--enable-weights-cpu-backup")
    if config.incremental_streaming:
        args.append("--incremental-streaming-output")
    if config.deterministic_inference:
        args.append("--enable-deterministic-inference")
    return prefix + args + list(config.extra_args)


def build_env(config: SGLangLaunchConfig, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The server's environment: the agent's (or `base`), with the GPUs and
    kvcached's switches set, and kvcached's switched off where not wanted (an
    agent started inside a kvcached environment must not pass it on)."""
    env = dict(os.environ if base is None else base)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in config.gpu_ids)
    env["PYTHONUNBUFFERED"] = "1"  # the log is read back when the server fails
    if config.kvcached:
        env["ENABLE_KVCACHED"] = "true"
        env["KVCACHED_AUTOPATCH"] = "1"
        env = with_agent_accounting(env)
        env["KVCACHED_IPC_NAME"] = config.kvcached_ipc_name
    else:
        env["ENABLE_KVCACHED"] = "false"
        env["KVCACHED_AUTOPATCH"] = "0"
        env.pop("KVCACHED_IPC_NAME", None)
    env.update(dict(config.extra_env))
    return env
