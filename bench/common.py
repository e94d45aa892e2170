"""Shared by the benchmark scripts: the run's environment, a plain-text
table, the JSON result file, and the dummy-weight model configs a fleet is
made of."""

from __future__ import annotations

import datetime
import json
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prism.cluster import LocalCluster

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/x.py` from anywhere
    sys.path.insert(0, str(ROOT))


# The Llama configs under bench/configs a GPU fleet is made of (dummy weights), by size.
GPU_CONFIGS = {"1b": "llama-3.2-1b", "3b": "llama-3.2-3b", "8b": "llama-3.1-8b"}


def dummy_model_folder(config_name: str, out_dir: str | Path) -> Path:
    """A folder with a bench config (bench/configs/NAME/config.json) and the tiny Llama tokenizer: what
    SGLang needs to serve the config with --load-format dummy (it will not start without a tokenizer).
    Token ids past the tiny vocabulary decode to nothing."""
    from prism.tiny_models import write_tokenizer

    folder = Path(out_dir) / config_name
    write_tokenizer(folder, "llama")
    (folder / "config.json").write_text((ROOT / "bench" / "configs" / config_name / "config.json").read_text())
    return folder


def parse_fleet(text: str, sizes=GPU_CONFIGS) -> list[str]:
    """'1b=4,3b=4,8b=4' -> the sizes of the models in order (the first model is the first size's)."""
    fleet = []
    for part in text.split(","):
        size, _, count = part.partition("=")
        if size not in sizes or not count.isdigit():
            raise SystemExit(f"--fleet wants SIZE=COUNT,... with sizes {', '.join(sizes)}; got {part!r}")
        fleet += [size] * int(count)
    return fleet


def environment() -> dict:
    import torch

    env = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "host": platform.node(),
    }
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec) per column."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        cells.append([format(row[key], spec) if row.get(key) is not None else "-" for key, _, spec in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def agent_status(address: str, timeout_s: float = 10.0):
    """One agent's GetStatus (engines, per-GPU memory split), over a plaintext channel."""
    import grpc

    from prism_client.v1 import agent_pb2, agent_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        return agent_pb2_grpc.AgentStub(channel).GetStatus(agent_pb2.GetStatusRequest(), timeout=timeout_s)


# ---- a live cluster's engines and memory, for the benchmarks that drive one ------------


def wait_loaded(cluster: LocalCluster, names: list[str], timeout_s: float) -> float:
    """Seconds until the agent has an engine of every model, on or off (the policies load them all)."""
    from prism_client.v1 import agent_pb2

    start = time.monotonic()
    settled = (agent_pb2.ENGINE_STATE_ACTIVE, agent_pb2.ENGINE_STATE_INACTIVE)
    while time.monotonic() - start < timeout_s:
        status = agent_status(cluster.agent_address)
        states = {e.model: e.state for e in status.engines}
        failed = [f"{e.model}: {e.error}" for e in status.engines if e.state == agent_pb2.ENGINE_STATE_FAILED]
        if failed:
            raise RuntimeError(f"engines failed to load: {failed}")
        if all(states.get(n) in settled for n in names):
            return time.monotonic() - start
        time.sleep(1.0)
    raise RuntimeError(f"not every model loaded within {timeout_s:.0f}s: {states}\n{cluster.log_tail('agent')}")


class MemorySampler:
    """Every second: each GPU's used memory (nvidia-smi, where there is one), the agent's split of
    each device (weights of the active engines, their KV limits, mapped KV), which engines are on,
    and each active engine's weights, mapped KV and KV limit."""

    def __init__(self, agent_address: str, interval_s: float = 1.0):
        self.agent_address = agent_address
        self.interval_s = interval_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._smi = shutil.which("nvidia-smi")

    def start(self) -> None:
        self.t0 = time.monotonic()
        self._thread.start()

    def stop(self) -> list[dict]:
        self._stop.set()
        self._thread.join()
        return self.samples

    def _run(self) -> None:
        from prism_client.v1 import agent_pb2

        while not self._stop.wait(self.interval_s):
            sample: dict = {"t": round(time.monotonic() - self.t0, 2)}
            if self._smi:
                try:
                    out = subprocess.run(
                        [self._smi, "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                        capture_output=True,
                        text=True,
                        timeout=5,
                    ).stdout
                    sample["used_mib"] = [int(line.split(",")[1]) for line in out.strip().splitlines()]
                except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                    pass
            try:
                status = agent_status(self.agent_address)
            except Exception:  # noqa: BLE001 - the agent busy for a moment: skip the sample's split
                self.samples.append(sample)
                continue
            sample["weights_gb"] = [round(g.weight_bytes / 1e9, 2) for g in status.gpus]
            sample["kv_limit_gb"] = [round(g.kv_limit_bytes / 1e9, 2) for g in status.gpus]
            sample["kv_mapped_gb"] = [round(g.kv_mapped_bytes / 1e9, 2) for g in status.gpus]
            sample["reserve_gb"] = [round(g.reserve_bytes / 1e9, 2) for g in status.gpus]  # measured overhead, if more
            sample["active"] = sorted(e.model for e in status.engines if e.state == agent_pb2.ENGINE_STATE_ACTIVE)
            # Each active engine's GPU memory, GB: weights + KV mapped (+ its KV limit, the KV its requests
            # use, the pages those are on, and its demand), per GPU.
            sample["engines_gb"] = [
                {
                    e.model: [
                        round(b / 1e9, 2)
                        for b in (
                            e.weight_bytes,
                            e.kv_mapped_bytes,
                            e.kv_limit_bytes,
                            e.kv_used_bytes,
                            e.kv_held_bytes,
                            e.kv_demand_bytes,
                        )
                    ]
                    for e in g.engines
                    if e.active
                }
                for g in status.gpus
            ]
            self.samples.append(sample)


def save_figure(fig, path: str | Path) -> None:
    """A matplotlib figure as the benchmarks' PNGs are: tight layout, 110 dpi; says where."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def write_json(path: str | Path | None, payload: dict) -> None:
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


async def first_token_s(engine) -> float:
    """Seconds until an engine (Engine or RemoteEngine) streams the first
    token of a one-token greedy request."""
    import time

    from services.gpu_agent.engine import GenerationRequest

    start = time.perf_counter()
    stream = engine.generate(
        GenerationRequest("first-token", prompt="Hello", max_tokens=1, temperature=0.0, ignore_eos=True)
    )
    async for _ in stream:
        break
    await stream.aclose()
    return time.perf_counter() - start
