"""The agents' side of the gateway's /metrics: on every scrape the gateway
asks each live agent for its status (concurrently, with a short deadline) and
exposes what they serve, per agent, device and model: KV limit, mapped, used
and demand, weights, the device's memory split, queued and running requests,
arrival rate, TTFT and TPOT percentiles, SLO attainment, shed and failed
requests.

One Prometheus endpoint then shows the whole cluster without scraping every
agent. The numbers are built fresh per scrape (a collector over this scrape's
replies), so an agent that is gone leaves no stale series behind; an agent
that does not answer in time is `prism_agent_up 0` and counted in
`prism_gateway_agent_scrape_errors_total`, never a failed scrape.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import grpc
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from prism_client.v1 import agent_pb2, agent_pb2_grpc

log = logging.getLogger(__name__)

AGENT_STATUS_TIMEOUT_S = 1.0


def engine_state_label(state: int) -> str:
    """ENGINE_STATE_ACTIVE -> "active" (an unknown number -> "unknown")."""
    try:
        return agent_pb2.EngineState.Name(state).removeprefix("ENGINE_STATE_").lower()
    except ValueError:
        return "unknown"


@dataclass(frozen=True)
class AgentScrape:
    agent_id: str
    status: agent_pb2.AgentStatus | None  # None: it did not answer in time
    error: str = ""


async def scrape_agents(
    agents: dict[str, str],
    stub_for: Callable[[str], agent_pb2_grpc.AgentStub],
    timeout_s: float = AGENT_STATUS_TIMEOUT_S,
) -> list[AgentScrape]:
    """GetStatus of every agent (agent_id -> address) at once; one slow or
    dead agent costs the scrape at most `timeout_s`."""

    async def one(agent_id: str, address: str) -> AgentScrape:
        try:
            status = await stub_for(address).GetStatus(agent_pb2.GetStatusRequest(), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.debug("status of agent %s at %s: %s", agent_id, address, exc.code().name)
            return AgentScrape(agent_id, None, exc.code().name)
        return AgentScrape(agent_id, status)

    return list(await asyncio.gather(*(one(a, addr) for a, addr in sorted(agents.items()))))


def _gpu_label(gpu_ids: Iterable[int]) -> str:
    return ",".join(str(g) for g in gpu_ids)


class AgentStatusCollector(Collector):
    """This scrape's agent replies as gauges. `known_model` keeps the model
    label to the cluster's registry, so series stay bounded."""

    def __init__(self, scrapes: list[AgentScrape], known_model: Callable[[str], bool]):
        self.scrapes = scrapes
        self.known_model = known_model

    def collect(self) -> Iterator[GaugeMetricFamily]:
        def gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"prism_agent_{name}", doc, labels=labels)

        up = gauge("up", "1 when the agent answered the gateway's status call of this scrape", ["agent"])

        gpu_labels = ["agent", "gpu"]
        gpu_fields = {  # GpuMemory field -> (metric, help)
            "total_bytes": ("gpu_total_bytes", "Device memory"),
            "weight_bytes": ("gpu_weight_bytes", "Weights of the active engines on the device"),
            "reserve_bytes": ("gpu_reserve_bytes", "Device memory kept free of weights and KV"),
            "kv_budget_bytes": ("gpu_kv_budget_bytes", "What the device's KV limits may sum to"),
            "kv_limit_bytes": ("gpu_kv_limit_bytes", "The device's engines' KV limits, summed"),
            "kv_mapped_bytes": ("gpu_kv_mapped_bytes", "Physical KV memory held on the device"),
            "free_bytes": ("gpu_free_bytes", "KV budget granted to no engine"),
        }
        gpus = {f: gauge(m, doc, gpu_labels) for f, (m, doc) in gpu_fields.items()}

        engine_labels = ["agent", "gpu", "model"]
        engine_fields = {  # EngineStatus field -> (metric, help)
            "memory_limit_bytes": ("engine_kv_limit_bytes", "The engine's KV memory limit"),
            "kv_mapped_bytes": ("engine_kv_mapped_bytes", "Physical KV memory the engine holds"),
            "kv_used_bytes": ("engine_kv_used_bytes", "KV memory its requests use"),
            "kv_cached_bytes": (
                "engine_kv_cached_bytes",
                "KV memory only its prefix cache keeps (given back first when memory is needed)",
            ),
            "prefix_cache_queried_tokens": (
                "engine_prefix_cache_queried_tokens",
                "Prompt tokens admitted with the prefix cache on, since the engine loaded",
            ),
            "prefix_cache_hit_tokens": (
                "engine_prefix_cache_hit_tokens",
                "Of those, tokens whose KV came from the prefix cache",
            ),
            "kv_demand_bytes": ("engine_kv_demand_bytes", "KV its running and queued requests need soon"),
            "weight_bytes": ("engine_weight_bytes", "The engine's weights"),
            "queued_requests": ("engine_queued_requests", "Requests waiting in the engine"),
            "admission_queued": ("engine_admission_queued_requests", "Requests waiting in the agent's admission queue"),
            "running_requests": ("engine_running_requests", "Requests the engine is running"),
            "priority": ("engine_priority", "The model's weight in memory and admission contention"),
        }
        engines = {f: gauge(m, doc, engine_labels) for f, (m, doc) in engine_fields.items()}
        state = gauge("engine_state", "1 for the engine's state", [*engine_labels, "state"])
        path = gauge(
            "engine_serving_path",
            "1, labelled with how the engine serves: its KV pool, attention kernels and CUDA graphs (on or off)",
            [*engine_labels, "kv_pool", "attention", "cuda_graphs"],
        )

        serving_fields = {  # ServingStats field -> (metric, help)
            "arrival_rate": ("model_arrival_rate", "Requests per second over the agent's window"),
            "slo_attainment": ("model_slo_attainment", "Fraction of the window's finished requests within both SLOs"),
            "finished_requests": ("model_finished_requests", "Requests finished in the window"),
            "shed_requests": ("model_shed_requests", "Requests refused (load shedding) in the window"),
            "failed_requests": ("model_failed_requests", "Requests that failed in the window"),
            "window_s": ("model_window_seconds", "The span the serving numbers cover"),
        }
        serving = {f: gauge(m, doc, engine_labels) for f, (m, doc) in serving_fields.items()}
        ttft = gauge(
            "model_ttft_seconds", "Time to first token over the window, by quantile", [*engine_labels, "quantile"]
        )
        tpot = gauge(
            "model_tpot_seconds", "Time per output token over the window, by quantile", [*engine_labels, "quantile"]
        )

        for scrape in self.scrapes:
            up.add_metric([scrape.agent_id], 1.0 if scrape.status is not None else 0.0)
            if scrape.status is None:
                continue
            for gpu in scrape.status.gpus:
                labels = [scrape.agent_id, str(gpu.gpu_id)]
                for f, family in gpus.items():
                    family.add_metric(labels, getattr(gpu, f))
            for engine in scrape.status.engines:
                if not self.known_model(engine.model):
                    continue
                labels = [scrape.agent_id, _gpu_label(engine.gpu_ids), engine.model]
                for f, family in engines.items():
                    family.add_metric(labels, getattr(engine, f))
                state.add_metric([*labels, engine_state_label(engine.state)], 1.0)
                if engine.kv_pool:  # loaded
                    path.add_metric(
                        [*labels, engine.kv_pool, engine.attention, "on" if engine.cuda_graphs else "off"], 1.0
                    )
                if not engine.HasField("serving"):
                    continue
                s = engine.serving
                for f, family in serving.items():
                    family.add_metric(labels, getattr(s, f))
                ttft.add_metric([*labels, "0.5"], s.ttft_p50_ms / 1000)
                ttft.add_metric([*labels, "0.99"], s.ttft_p99_ms / 1000)
                tpot.add_metric([*labels, "0.5"], s.tpot_p50_ms / 1000)
                tpot.add_metric([*labels, "0.99"], s.tpot_p99_ms / 1000)

        yield up
        yield from gpus.values()
        yield from engines.values()
        yield state
        yield path
        yield from serving.values()
        yield ttft
        yield tpot
