"""What `prism status` and `prism top` show: the records in etcd and each live
agent's own status (GetStatus: per-GPU memory split, per-model queue, KV and
serving numbers), read together, and their text rendering.

Reading and rendering are apart so the rendering is a pure function of a
snapshot. An agent that does not answer within a second is shown as such;
the rest of the picture still comes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import aetcd
import grpc
from google.protobuf.json_format import MessageToDict

from prism_client.v1 import agent_pb2, agent_pb2_grpc
from services.common import records
from services.common.etcd import EtcdAccess, connect
from services.common.tls import TlsFiles, aio_channel

STATUS_TIMEOUT_S = 1.0
BAR_WIDTH = 48


def state_name(state: int) -> str:
    """ENGINE_STATE_ACTIVE -> "active" (a state this client does not know -> "?")."""
    try:
        return agent_pb2.EngineState.Name(state).removeprefix("ENGINE_STATE_").lower()
    except ValueError:
        return "?"


@dataclass
class AgentView:
    record: dict  # the agent's record in etcd
    status: agent_pb2.AgentStatus | None = None  # None: it did not answer
    error: str = ""

    @property
    def agent_id(self) -> str:
        return self.record["agent_id"]


@dataclass
class ClusterSnapshot:
    models: list[dict] = field(default_factory=list)
    agents: list[AgentView] = field(default_factory=list)
    engines: list[dict] = field(default_factory=list)
    placements: list[dict] = field(default_factory=list)
    taken_at: float = 0.0  # time.time()
    scheduler_leader: dict | None = None  # the leading scheduler replica's record; None: none leads
    # The leader's status record (plans made, the step costs it prices compute with); None: not written yet.
    scheduler_status: dict | None = None

    def to_json(self) -> dict:
        return {
            "models": self.models,
            "agents": [a.record for a in self.agents],
            "engines": self.engines,
            "placements": self.placements,
            "scheduler_leader": self.scheduler_leader,
            "scheduler_status": self.scheduler_status,
            "agent_status": {
                a.agent_id: MessageToDict(a.status, preserving_proto_field_name=True)
                if a.status is not None
                else {"error": a.error}
                for a in self.agents
            },
        }


class ClusterReader:
    """Reads snapshots from one etcd, keeping its connection and the agents'
    channels between reads (`prism top` reads every second). etcd_access:
    TLS and user of the etcd connection; tls: the CA (and, for agents that
    require one, the client certificate) of the calls to the agents."""

    def __init__(
        self,
        etcd_endpoint: str,
        status_timeout_s: float = STATUS_TIMEOUT_S,
        *,
        etcd_access: EtcdAccess = EtcdAccess(),
        tls: TlsFiles | None = None,
    ):
        self.etcd_endpoint = etcd_endpoint
        self.status_timeout_s = status_timeout_s
        self.etcd_access = etcd_access
        self.tls = tls
        self._client: aetcd.Client | None = None  # connected at the first read
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def read(self) -> ClusterSnapshot:
        """Raises ConnectionError when etcd cannot be reached."""
        if self._client is None:
            self._client = await connect(self.etcd_endpoint, timeout_s=5, access=self.etcd_access)
        found: dict[str, list[dict]] = {}
        for name, prefix in (
            ("models", records.MODELS),
            ("agents", records.AGENTS),
            ("engines", records.ENGINES),
            ("placements", records.PLACEMENTS),
        ):
            found[name] = [json.loads(kv.value) for kv in await self._client.get_prefix(prefix.encode())]
        agents = [AgentView(record) for record in found["agents"]]
        await asyncio.gather(*(self._ask(agent) for agent in agents))
        leader = await self._client.get(records.SCHEDULER_LEADER.encode())
        status = await self._client.get(records.SCHEDULER_STATUS.encode())
        return ClusterSnapshot(
            models=found["models"],
            agents=agents,
            engines=found["engines"],
            placements=found["placements"],
            taken_at=time.time(),
            scheduler_leader=json.loads(leader.value) if leader is not None else None,
            scheduler_status=json.loads(status.value) if status is not None else None,
        )

    async def _ask(self, agent: AgentView) -> None:
        address = agent.record["address"]
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = aio_channel(address, self.tls)
        try:
            agent.status = await agent_pb2_grpc.AgentStub(channel).GetStatus(
                agent_pb2.GetStatusRequest(), timeout=self.status_timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            agent.error = f"no status ({exc.code().name})"

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._channels.values()), return_exceptions=True)
        self._channels.clear()
        if self._client is not None:
            await self._client.close()
            self._client = None


# ---- rendering ---------------------------------------------------------------


def fmt_bytes(n: int) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def memory_bar(gpu: agent_pb2.GpuMemory, width: int = BAR_WIDTH) -> str:
    """The device as a bar: '#' weights, 'r' reserve, a letter per engine's
    KV limit (A for the first engine listed, ...), '.' free. Every non-empty
    part gets at least one cell, so a small engine stays visible."""
    total = max(gpu.total_bytes, 1)
    parts = [("#", gpu.weight_bytes), ("r", gpu.reserve_bytes)]
    parts += [(engine_letter(i), e.kv_limit_bytes) for i, e in enumerate(gpu.engines)]
    cells = [(ch, max(1, round(nbytes / total * width)) if nbytes > 0 else 0) for ch, nbytes in parts]
    used = sum(n for _, n in cells)
    bar = "".join(ch * n for ch, n in cells)[:width]
    return "[" + bar + "." * max(0, width - used) + "]"


def engine_letter(index: int) -> str:
    return chr(ord("A") + index % 26)


def gpu_lines(snapshot: ClusterSnapshot, bar_width: int = BAR_WIDTH) -> list[str]:
    lines = []
    for agent in snapshot.agents:
        if agent.status is None:
            lines.append(f"{agent.agent_id}: {agent.error}")
            continue
        split = {g.gpu_id: g for g in agent.status.gpus}
        for device in agent.status.devices:
            gpu = split.get(device.index)
            head = f"{agent.agent_id} gpu {device.index} ({device.kind}, {fmt_bytes(device.memory_bytes)})"
            if gpu is None:
                lines.append(f"{head}  no memory split reported")
                continue
            lines.append(f"{head}  {memory_bar(gpu, bar_width)}")
            lines.append(
                f"    weights {fmt_bytes(gpu.weight_bytes)}  reserve {fmt_bytes(gpu.reserve_bytes)}  "
                f"KV budget {fmt_bytes(gpu.kv_budget_bytes)}  limits {fmt_bytes(gpu.kv_limit_bytes)}  "
                f"mapped {fmt_bytes(gpu.kv_mapped_bytes)}  free {fmt_bytes(gpu.free_bytes)}"
            )
            for i, e in enumerate(gpu.engines):
                lines.append(
                    f"    {engine_letter(i)} {e.model:<20} {'active' if e.active else 'off':<7}"
                    f" weights {fmt_bytes(e.weight_bytes):>9}  KV limit {fmt_bytes(e.kv_limit_bytes):>9}"
                    f"  mapped {fmt_bytes(e.kv_mapped_bytes):>9}  used {fmt_bytes(e.kv_used_bytes):>9}"
                    f"  demand {fmt_bytes(e.kv_demand_bytes):>9}"
                )
    return lines


MODEL_COLUMNS = (
    "MODEL",
    "AGENT",
    "GPU",
    "STATE",
    "QUEUED",
    "RUN",
    "REQ/S",
    "TTFT p50/p99 ms",
    "TPOT p50/p99 ms",
    "SLO",
    "SHED",
    "FAIL",
    "PATH",
    "CACHE hit/kept",
    "KV used/limit",
)


def model_rows(snapshot: ClusterSnapshot) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for agent in snapshot.agents:
        if agent.status is None:
            continue
        for e in sorted(agent.status.engines, key=lambda e: e.model):
            s = e.serving
            served = e.HasField("serving")
            rows.append(
                (
                    e.model,
                    agent.agent_id,
                    ",".join(map(str, e.gpu_ids)),
                    state_name(e.state),
                    str(e.admission_queued + e.queued_requests),
                    str(e.running_requests),
                    f"{s.arrival_rate:.2f}" if served else "-",
                    f"{s.ttft_p50_ms:.0f}/{s.ttft_p99_ms:.0f}" if served and s.finished_requests else "-",
                    f"{s.tpot_p50_ms:.1f}/{s.tpot_p99_ms:.1f}" if served and s.tpot_p99_ms else "-",
                    f"{s.slo_attainment:.0%}" if served and s.finished_requests else "-",
                    str(s.shed_requests),
                    str(s.failed_requests),
                    serving_path(e),
                    prefix_cache(e),
                    f"{fmt_bytes(e.kv_used_bytes)}/{fmt_bytes(e.memory_limit_bytes)}",
                )
            )
    return rows


def prefix_cache(engine: agent_pb2.EngineStatus) -> str:
    """The prefix cache's hit rate over the prompt tokens admitted since the engine loaded, and the KV
    memory only the cache keeps; "-" before any prompt was admitted with it on."""
    if not engine.prefix_cache_queried_tokens:
        return "-"
    rate = engine.prefix_cache_hit_tokens / engine.prefix_cache_queried_tokens
    return f"{rate:.0%}/{fmt_bytes(engine.kv_cached_bytes).replace(' ', '')}"


def serving_path(engine: agent_pb2.EngineStatus) -> str:
    """How the engine serves, in one word: its KV pool/attention, and /graphs where decode replays CUDA graphs."""
    if not engine.kv_pool:
        return "-"  # not loaded yet
    return f"{engine.kv_pool}/{engine.attention}" + ("/graphs" if engine.cuda_graphs else "")


def table(header: tuple[str, ...], rows: Sequence[tuple[str, ...]], indent: str = "") -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [indent + "  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]


def plans_line(snapshot: ClusterSnapshot) -> str:
    """How many plans the leader made and how long ago the last was, from its status record."""
    status = snapshot.scheduler_status
    if not status:
        return "no plan published yet"
    ago = max(0.0, (snapshot.taken_at or time.time()) - status["planned_at"])
    return f"{status['plans']} plan(s) by {status['scheduler_id']}, the last {ago:.1f} s ago"


def compute_cost_lines(snapshot: ClusterSnapshot, indent: str = "") -> list[str]:
    """The step costs the scheduler prices compute with, a row per model size: measured (the steps its
    engines ran, fitted over the card's profile) or the profile's alone."""
    costs = snapshot.scheduler_status
    if not costs:
        return [indent + "not published yet (the scheduler writes them as it plans)"]
    rows = [
        (
            f"{p['weight_bytes'] / 1e9:.2f} GB",
            f"{1e3 * p['decode_base_s']:.2f}",
            f"{1e6 * p['decode_per_seq_s']:.1f}",
            f"{1e3 * p['prefill_base_s']:.2f}",
            f"{1e6 * p['prefill_per_token_s']:.2f}",
            f"{1e6 * p.get('prefill_per_seq_s', 0.0):.1f}",
            f"measured ({p['measured_steps']:.0f} steps)" if p.get("measured_steps") else "profile",
        )
        for p in costs["points"]
    ]
    header = ("weights", "decode ms", "per seq us", "prefill ms", "per token us", "per prompt us", "from")
    return table(header, rows, indent) + [
        f"{indent}decode attention reads KV at {costs['attention_bytes_per_s'] / 1e9:.0f} GB/s"
    ]


def model_lines(snapshot: ClusterSnapshot, indent: str = "") -> list[str]:
    rows = model_rows(snapshot)
    if not rows:
        return [indent + "no engines"]
    return table(MODEL_COLUMNS, rows, indent)


def top_frame(snapshot: ClusterSnapshot, etcd_endpoint: str, interval_s: float | None) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(snapshot.taken_at))
    every = f"every {interval_s:g}s, Ctrl-C quits" if interval_s else "one frame"
    lines = [
        f"prism top  {when}  etcd {etcd_endpoint}  {len(snapshot.agents)} agent(s)  ({every})",
        "",
        "GPUs  (# weights, r reserve, A.. KV limit per engine, . free)",
    ]
    lines += ["  " + line for line in gpu_lines(snapshot)] or ["  no agents"]
    lines += ["", "models  (window of each agent's serving stats; SLO: finished requests within TTFT and TPOT)"]
    lines += model_lines(snapshot, indent="  ")
    return "\n".join(lines)
