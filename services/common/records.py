"""The placement state kept in etcd: its key layout and its JSON records.

Everything lives under PREFIX = "/prism/v1/":

  models/<model>               ModelRecord      written by the scheduler from the config
  agents/<agent_id>            AgentRecord      written by the agent, under its lease
  engines/<agent_id>/<model>   EngineRecord     written by the agent, under its lease
  placements/<model>           PlacementRecord  written by the scheduler
  demand/<model>/<gateway_id>  DemandRecord     written by a gateway while requests for the
                                                model wait for it to become servable, under
                                                a short lease; deleted when none waits
  scheduler/leader             LeaderRecord     the scheduler replica that leads, under its
                                                short lease (leader election)

An agent that dies stops refreshing its lease, so its agents/ and engines/
keys disappear on their own; readers treat a placement on a missing agent as
unavailable. Values are JSON objects; unknown fields are ignored on read so
newer writers do not break older readers.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, TypeVar

PREFIX = "/prism/v1/"
MODELS = PREFIX + "models/"
AGENTS = PREFIX + "agents/"
ENGINES = PREFIX + "engines/"
PLACEMENTS = PREFIX + "placements/"
DEMAND = PREFIX + "demand/"
# Created only if absent, under the leader's lease: whoever wrote it leads until the lease ends.
SCHEDULER_LEADER = PREFIX + "scheduler/leader"
SCHEDULER_STATUS = PREFIX + "scheduler/status"

T = TypeVar("T")


def _from_json(cls: type[T], raw: bytes | str) -> T:
    data = json.loads(raw)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names})


class _Record:
    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, raw: bytes | str):  # noqa: ANN206 - returns cls
        return _from_json(cls, raw)


@dataclass
class ModelRecord(_Record):
    name: str
    path: str
    tp_size: int = 1
    load_format: str = "auto"
    engine: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    ttft_ms: float = 0.0  # the model's TTFT SLO; 0: the default (the gateway bounds cold-start waits by it)
    max_context: int = 0  # --context-length of its SGLang engines; 0: the model's own
    deterministic_inference: bool = False  # its SGLang engines honour requests' seeds

    def key(self) -> str:
        return MODELS + self.name


@dataclass
class DeviceRecord(_Record):
    index: int
    kind: str  # "cuda" | "cpu"
    name: str
    memory_bytes: int


@dataclass
class AgentRecord(_Record):
    agent_id: str
    address: str  # host:port of the agent's gRPC server
    devices: list[dict[str, Any]] = field(default_factory=list)  # DeviceRecord dicts
    started_at: float = 0.0

    def key(self) -> str:
        return AGENTS + self.agent_id


# draining: being unloaded; it finishes the requests it has and is then gone
# (its key deleted). Gateways send it new requests only while the model has
# no servable replica; the scheduler no longer counts it as placed.
ENGINE_STATES = ("loading", "active", "inactive", "draining", "failed")


@dataclass
class EngineRecord(_Record):
    agent_id: str
    model: str
    state: str  # one of ENGINE_STATES
    gpu_ids: list[int] = field(default_factory=list)
    max_context: int = 0
    error: str = ""

    def key(self) -> str:
        return engine_key(self.agent_id, self.model)

    @property
    def servable(self) -> bool:
        # An inactive engine is re-activated by its agent on the first request.
        return self.state in ("active", "inactive")


def engine_key(agent_id: str, model: str) -> str:
    return f"{ENGINES}{agent_id}/{model}"


@dataclass
class Replica(_Record):
    agent_id: str
    gpu_ids: list[int]
    active: bool = True
    memory_limit_bytes: int = 0


@dataclass
class PlacementRecord(_Record):
    model: str
    replicas: list[dict[str, Any]] = field(default_factory=list)  # Replica dicts
    revision: int = 0  # bumped by the scheduler on every change

    def key(self) -> str:
        return PLACEMENTS + self.model

    def replica_list(self) -> list[Replica]:
        return [Replica(**r) for r in self.replicas]


@dataclass
class LeaderRecord(_Record):
    """The leading scheduler replica: agents send their load reports to `address`."""

    scheduler_id: str
    address: str  # its gRPC address, as agents reach it
    elected_at: float  # wall-clock time (time.time()) it won the election

    def key(self) -> str:
        return SCHEDULER_LEADER


@dataclass
class SchedulerStatusRecord(_Record):
    """What the leading scheduler has done (written every --status-interval-s at most): the plans it has
    made and when the last was, and the step costs it prices compute with (services/scheduler/policies/
    compute.py ComputeCosts): per model size (weight bytes) a point, with the steps its engines measured
    behind it (0: the card's profile alone)."""

    scheduler_id: str
    plans: int  # made by this replica since it began leading
    planned_at: float  # wall-clock time (time.time()) of the last
    attention_bytes_per_s: float
    points: list[dict]  # StepCost's fields and measured_steps

    def key(self) -> str:
        return SCHEDULER_STATUS


@dataclass
class DemandRecord(_Record):
    """Requests of one gateway waiting for `model` to become servable (no
    engine on a live agent yet): the scheduler counts them as queued demand."""

    model: str
    gateway_id: str
    waiting: int  # requests waiting now
    since: float  # wall-clock time (time.time()) the oldest of them arrived

    def key(self) -> str:
        return demand_key(self.model, self.gateway_id)


def demand_key(model: str, gateway_id: str) -> str:
    return f"{DEMAND}{model}/{gateway_id}"
