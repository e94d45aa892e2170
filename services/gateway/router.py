"""Which agent serves a model: a live view of the placement state in etcd.

The router mirrors models/, placements/, agents/ and engines/. A replica is
live when its agent's key exists (the agent holds it under its lease) and
its engine record is servable; a request goes to the active replica with the
fewest requests this gateway has in flight on it (a replica that has just
come up takes the new requests while the others work off what they hold),
round robin among equals, and to a switched-off one (its agent switches it
on) only when none is active. A model that is placed but has no live replica yet (moved: its new
replica still loads) is served by its draining engines (being unloaded, no
longer placed) while they last, rather than waited for; a model placed
nowhere (its policy left it out) is not. It keeps one gRPC channel per agent address and closes the
channels of agents that vanish; a channel whose agent stops answering its
keepalive pings fails its calls (channel_options). Every change it sees sets the event that
next_change() handed out, so a request waiting for its model to become
servable (services/gateway/cold_start.py) wakes on it instead of polling.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from dataclasses import dataclass
from typing import TypeVar

import aetcd
import grpc

from prism_client.v1 import agent_pb2_grpc
from services.common import records
from services.common.etcd import EtcdAccess, PrefixMirror, connect
from services.common.routing import route_order
from services.common.tls import TlsFiles, aio_channel
from services.gateway.errors import ModelNotFound, ModelUnavailable
from services.gpu_agent.slo import DEFAULT_TTFT_MS

log = logging.getLogger(__name__)

R = TypeVar("R")

# An agent that restarts at the same address must be reachable again within
# a second, not after gRPC's default reconnect backoff of up to two minutes.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 << 20),
]
# A frozen agent (stopped, a hung host, a network partition) keeps its TCP connection open and answers
# nothing, so the calls on it would wait out their whole deadline (--request-timeout-s, 600 s). The
# gateway pings each agent connection that has calls open every keepalive interval and drops it when a
# ping goes unanswered as long: its calls fail with UNAVAILABLE, which the clients get as an explicit
# error. Agents accept pings however often they come (services/gpu_agent/server.py).
DEFAULT_AGENT_KEEPALIVE_S = 10.0


def channel_options(keepalive_s: float) -> list[tuple[str, int]]:
    ms = max(1, round(keepalive_s * 1000))
    # gRPC core times an unanswered ping out after grpc.http2.ping_timeout_ms (1 min by default), whatever
    # the keepalive timeout says: both are set.
    return [
        *CHANNEL_OPTIONS,
        ("grpc.keepalive_time_ms", ms),
        ("grpc.keepalive_timeout_ms", ms),
        ("grpc.http2.ping_timeout_ms", ms),
        ("grpc.http2.max_pings_without_data", 0),
    ]  # ping a silent agent for as long as calls wait


@dataclass(frozen=True)
class ModelStatus:
    name: str
    available: bool  # at least one live replica
    max_context: int  # from the engine records on live agents; 0 when none has loaded


class GatewayNotReady(ModelUnavailable):
    pass


def _parse(cls: type[R], raw: bytes | None, key: str) -> R | None:
    """A record, or None (with a warning) when the stored value is unreadable."""
    if raw is None:
        return None
    try:
        return cls.from_json(raw)  # type: ignore[attr-defined]
    except (ValueError, TypeError) as exc:
        log.warning("ignoring unreadable record %s: %s", key, exc)
        return None


class Router:
    def __init__(
        self,
        etcd_endpoint: str,
        channel_close_grace_s: float = 600.0,
        *,
        etcd_access: EtcdAccess = EtcdAccess(),
        tls: TlsFiles | None = None,
        agent_keepalive_s: float = DEFAULT_AGENT_KEEPALIVE_S,
    ):
        """etcd_access: TLS and user of the etcd connection; tls: the
        gateway's TLS files for its calls to the agents (None: plaintext);
        agent_keepalive_s: how soon a frozen agent's calls fail (see
        channel_options)."""
        self.etcd_endpoint = etcd_endpoint
        self._channel_options = channel_options(agent_keepalive_s)
        self.etcd_access = etcd_access
        self.tls = tls
        # In-flight calls to an agent whose key vanished may still finish
        # (a lost lease is not always a dead agent); they get this long.
        self._close_grace_s = channel_close_grace_s
        self._client: aetcd.Client | None = None
        self._mirrors: dict[str, PrefixMirror] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, agent_pb2_grpc.AgentStub] = {}
        self._turns: dict[str, itertools.count] = {}
        self._in_flight: dict[tuple[str, str], int] = {}  # (model, agent address) -> requests relayed there
        self._closing: set[asyncio.Task] = set()
        self._changed = asyncio.Event()  # set (and replaced) on every change of the mirrored state

    # ---- life cycle -----------------------------------------------------

    async def run(self) -> None:
        """Connects to etcd (retrying for as long as it takes) and follows it."""
        while self._client is None:
            try:
                self._client = await connect(self.etcd_endpoint, access=self.etcd_access)
            except ConnectionError as exc:
                log.warning("%s; still trying", exc)
        self._mirrors = {
            prefix: PrefixMirror(self._client, prefix, self._on_change)
            for prefix in (records.MODELS, records.PLACEMENTS, records.AGENTS, records.ENGINES)
        }
        await asyncio.gather(*(mirror.run() for mirror in self._mirrors.values()))

    @property
    def etcd(self) -> aetcd.Client | None:
        """The router's etcd client, once connected (shared with the demand publisher)."""
        return self._client

    def next_change(self) -> asyncio.Event:
        """An event set at the next change of models, placements, agents or
        engines. Take it before looking at the state, then wait on it: no
        change in between is missed."""
        return self._changed

    @property
    def ready(self) -> bool:
        """True once every prefix has been loaded from etcd."""
        return bool(self._mirrors) and all(m.ready.is_set() for m in self._mirrors.values())

    async def wait_ready(self) -> None:
        while not self._mirrors:
            await asyncio.sleep(0.05)
        await asyncio.gather(*(m.ready.wait() for m in self._mirrors.values()))

    async def close(self) -> None:
        channels = list(self._channels.values())
        self._channels.clear()
        self._stubs.clear()
        await asyncio.gather(*(c.close(grace=None) for c in channels), return_exceptions=True)
        for task in list(self._closing):
            task.cancel()
        if self._client is not None:
            await self._client.close()
            self._client = None

    # ---- the view ------------------------------------------------------

    def _items(self, prefix: str) -> dict[str, bytes]:
        if not self.ready:
            raise GatewayNotReady("the gateway has not loaded the cluster state from etcd yet")
        return self._mirrors[prefix].items

    def has_model(self, model: str) -> bool:
        return self.ready and records.MODELS + model in self._mirrors[records.MODELS].items

    def ttft_slo_s(self, model: str) -> float:
        """The model's TTFT SLO from the registry (the agents' default where the config sets none)."""
        key = records.MODELS + model
        record = _parse(records.ModelRecord, self._items(records.MODELS).get(key), key)
        return ((record.ttft_ms if record else 0) or DEFAULT_TTFT_MS) / 1000

    def _replica_states(self, model: str) -> list[tuple[str, str | None, records.EngineRecord | None]]:
        """(agent_id, agent address or None, engine record or None) per placed replica."""
        key = records.PLACEMENTS + model
        placement = _parse(records.PlacementRecord, self._items(records.PLACEMENTS).get(key), key)
        states = []
        for replica in placement.replica_list() if placement else []:
            agent_key = records.AGENTS + replica.agent_id
            agent = _parse(records.AgentRecord, self._items(records.AGENTS).get(agent_key), agent_key)
            engine_key = records.engine_key(replica.agent_id, model)
            engine = _parse(records.EngineRecord, self._items(records.ENGINES).get(engine_key), engine_key)
            states.append((replica.agent_id, agent.address if agent else None, engine))
        return states

    def candidates(self, model: str, prefix_key: str | None = None) -> list[str]:
        """Addresses of the agents serving `model`, starting with this
        request's pick (route_order, with the request's prefix_key: see
        routing.py); the rest are fallbacks in order.

        Raises ModelNotFound for a model the cluster does not have and
        ModelUnavailable when none of its replicas is live."""
        if records.MODELS + model not in self._items(records.MODELS):
            raise ModelNotFound(f"The model {model!r} does not exist", param="model")
        # address -> whether its engine is active (a switched-off one is servable too: its agent switches
        # it on for a request)
        servable: dict[str, bool] = {}
        reasons: list[str] = []
        replicas = self._replica_states(model)
        for agent_id, address, engine in replicas:
            if address is None:
                reasons.append(f"agent {agent_id} is not registered")
            elif engine is None:
                reasons.append(f"agent {agent_id} has no engine for it")
            elif not engine.servable:
                reasons.append(f"its engine on agent {agent_id} is {engine.state}")
            elif address not in servable:
                servable[address] = engine.state == "active"
        if not servable and replicas:
            # Placed, none servable yet (a move): one on its way out serves meanwhile.
            servable = dict.fromkeys(self._draining(model), True)
        if not servable:
            why = "; ".join(reasons) if reasons else "it is not placed on any agent"
            raise ModelUnavailable(f"model {model!r} has no live replica ({why})")
        turn = next(self._turns.setdefault(model, itertools.count()))
        return route_order(
            list(servable),
            servable.__getitem__,
            lambda address: self._in_flight.get((model, address), 0),
            turn,
            prefix_key,
        )

    def began(self, model: str, address: str) -> None:
        """A request for `model` was sent to the agent at `address` (the relay tells)."""
        key = (model, address)
        self._in_flight[key] = self._in_flight.get(key, 0) + 1

    def ended(self, model: str, address: str) -> None:
        """That request ended there (finished, failed, cancelled or sent elsewhere)."""
        key = (model, address)
        left = self._in_flight.get(key, 0) - 1
        if left > 0:
            self._in_flight[key] = left
        else:
            self._in_flight.pop(key, None)

    def _draining(self, model: str) -> list[str]:
        """Addresses of the live agents whose engine of `model` is draining
        (being unloaded: it finishes what it has, then goes)."""
        agents = self._items(records.AGENTS)
        out = []
        for key, value in sorted(self._items(records.ENGINES).items()):
            if not key.endswith("/" + model):
                continue
            engine = _parse(records.EngineRecord, value, key)
            if engine is None or engine.model != model or engine.state != "draining":
                continue
            agent_key = records.AGENTS + engine.agent_id
            agent = _parse(records.AgentRecord, agents.get(agent_key), agent_key)
            if agent is not None and agent.address not in out:
                out.append(agent.address)
        return out

    def route(self, model: str) -> str:
        """The address of the agent that should serve the next request for `model`."""
        return self.candidates(model)[0]

    def live_agents(self) -> dict[str, str]:
        """agent_id -> address of every registered agent; empty until the state is loaded."""
        if not self.ready:
            return {}
        agents = {}
        for key, value in self._mirrors[records.AGENTS].items.items():
            agent = _parse(records.AgentRecord, value, key)
            if agent is not None:
                agents[agent.agent_id] = agent.address
        return agents

    def list_models(self) -> list[ModelStatus]:
        models = []
        for key in sorted(self._items(records.MODELS)):
            name = key[len(records.MODELS) :]
            replicas = self._replica_states(name)
            engines = [e for _, address, e in replicas if address is not None and e is not None]
            available = any(e.servable for e in engines) or bool(replicas and self._draining(name))
            models.append(
                ModelStatus(
                    name=name, available=available, max_context=max((e.max_context for e in engines), default=0)
                )
            )
        return models

    # ---- channels ------------------------------------------------------

    def stub(self, address: str) -> agent_pb2_grpc.AgentStub:
        stub = self._stubs.get(address)
        if stub is None:
            channel = aio_channel(address, self.tls, options=self._channel_options)
            self._channels[address] = channel
            stub = self._stubs[address] = agent_pb2_grpc.AgentStub(channel)
        return stub

    def channel_addresses(self) -> set[str]:
        """The agent addresses with an open channel."""
        return set(self._channels)

    def _on_change(self, key: str, value: bytes | None) -> None:
        if key.startswith(records.AGENTS):
            self._on_agent_change(key, value)
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _on_agent_change(self, key: str, value: bytes | None) -> None:
        # Any agent change may retire an address: close channels no live agent uses.
        agents = self._mirrors[records.AGENTS].items
        addresses = {a.address for k, v in agents.items() if (a := _parse(records.AgentRecord, v, k)) is not None}
        for address in [a for a in self._channels if a not in addresses]:
            log.info("agent at %s is gone; closing its channel", address)
            channel = self._channels.pop(address)
            self._stubs.pop(address, None)
            task = asyncio.create_task(channel.close(grace=self._close_grace_s))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
