"""Prometheus metrics of the gateway, in a registry of its own (so several
gateways can live in one test process). Status codes are HTTP statuses for
both APIs (a gRPC error counts as its REST twin would; 499 is a client that
left early), so one dashboard covers REST and gRPC.

Requests the gateway's access control refuses (services/gateway/access.py)
count in prism_gateway_rejected_requests_total by reason; those refused
before their body is parsed (no or a bad key, rate, size) are not in
prism_gateway_requests_total, whose `model` label needs the parsed body.

Each scrape also carries what the agents serve (services/gateway/agent_metrics.py):
`render_cluster` asks every live agent for its status first."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from services.gateway.agent_metrics import AGENT_STATUS_TIMEOUT_S, AgentStatusCollector, scrape_agents

if TYPE_CHECKING:
    from services.gateway.router import Router

UNKNOWN_MODEL = "unknown"  # the label of names the cluster does not have, so clients cannot add series
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class GatewayMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, agent_status_timeout_s: float = AGENT_STATUS_TIMEOUT_S) -> None:
        self.agent_status_timeout_s = agent_status_timeout_s
        self.registry = CollectorRegistry()
        self.agent_scrape_errors = Counter(
            "prism_gateway_agent_scrape_errors",
            "Agents that did not answer a /metrics status call in time",
            ["agent"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "prism_gateway_rejected_requests",
            "Requests refused by the gateway's access control, by API (rest, grpc), reason (auth, forbidden, "
            "too_large, prompt_too_long, max_tokens, rate_limited, too_many_streams) and API key name",
            ["api", "reason", "key"],
            registry=self.registry,
        )
        self.requests = Counter(
            "prism_gateway_requests",
            "Generate requests by API, model and status code",
            ["api", "model", "code"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "prism_gateway_time_to_first_token_seconds",
            "From a request's arrival to its first generated token",
            ["api", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.latency = Histogram(
            "prism_gateway_request_duration_seconds",
            "End-to-end duration of successful generate requests",
            ["api", "model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.generated_tokens = Counter(
            "prism_gateway_generated_tokens",
            "Tokens generated and relayed to clients",
            ["api", "model"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "prism_gateway_requests_in_flight",
            "Generate requests being served",
            ["api", "model"],
            registry=self.registry,
        )
        # Cold starts (services/gateway/cold_start.py): requests whose model had no servable engine on arrival.
        self.cold_start_wait = Histogram(
            "prism_gateway_cold_start_wait_seconds",
            "How long a request for a model with no servable engine waited for one, by outcome "
            "(served: one became servable; timeout: none did within the bound; cancelled: the client left)",
            ["model", "outcome"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.cold_start_waiting = Gauge(
            "prism_gateway_cold_start_waiting",
            "Requests waiting now for their model to become servable",
            ["model"],
            registry=self.registry,
        )

    def track(self, api: str, model: str) -> RequestTracker:
        return RequestTracker(self, api, model)

    def render(self) -> bytes:
        """The gateway's own metrics alone."""
        return generate_latest(self.registry)

    async def render_cluster(self, router: Router) -> bytes:
        """The gateway's metrics and every live agent's, asked for now."""
        scrapes = await scrape_agents(router.live_agents(), router.stub, self.agent_status_timeout_s)
        for scrape in scrapes:
            if scrape.status is None:
                self.agent_scrape_errors.labels(scrape.agent_id).inc()
        agents = CollectorRegistry(auto_describe=False)
        agents.register(AgentStatusCollector(scrapes, router.has_model))
        # Two registries in the text format concatenate into one valid exposition (names do not overlap).
        return generate_latest(self.registry) + generate_latest(agents)


class RequestTracker:
    """Measures one generate request; finish() records it once."""

    def __init__(self, metrics: GatewayMetrics, api: str, model: str):
        self._metrics = metrics
        self._labels = (api, model)
        self._start = time.monotonic()
        self._first_token_seen = False
        self.finished = False
        metrics.in_flight.labels(*self._labels).inc()

    def tokens(self, count: int) -> None:
        if count <= 0:
            return
        if not self._first_token_seen:
            self._first_token_seen = True
            self._metrics.time_to_first_token.labels(*self._labels).observe(time.monotonic() - self._start)
        self._metrics.generated_tokens.labels(*self._labels).inc(count)

    def finish(self, http_status: int) -> None:
        if self.finished:
            return
        self.finished = True
        self._metrics.in_flight.labels(*self._labels).dec()
        self._metrics.requests.labels(*self._labels, str(http_status)).inc()
        if http_status == 200:
            self._metrics.latency.labels(*self._labels).observe(time.monotonic() - self._start)
