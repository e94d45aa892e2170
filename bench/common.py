"""Shared by the benchmark scripts: the run's environment, a plain-text
table, and the JSON result file."""

from __future__ import annotations

import datetime
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python bench/x.py` from anywhere
    sys.path.insert(0, str(ROOT))


def environment() -> dict:
    import torch

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__, "host": platform.node()}
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

    from prism.v1 import agent_pb2, agent_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        return agent_pb2_grpc.AgentStub(channel).GetStatus(agent_pb2.GetStatusRequest(), timeout=timeout_s)


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
    stream = engine.generate(GenerationRequest("first-token", prompt="Hello", max_tokens=1, temperature=0.0,
                                               ignore_eos=True))
    async for _ in stream:
        break
    await stream.aclose()
    return time.perf_counter() - start
