"""Each model's demand as the scheduler reads it from its engines' load reports: their counts added
up, its arrival rates those of the model's requests over the report window, whichever engine took
them, and engines that have left still counting theirs.

An engine reports its arrival rate over its window (a minute; the recent rate over ten seconds), or
over its life while that is shorter. Adding the engines' rates, as the scheduler did, misreads a
model whose replicas change, both ways:
- a replica added reads its share of the model's rate at once (its life is its window) while the
  older replicas' windows still count the share it has taken over: the sum overshoots for a minute;
- a replica unloaded takes the requests it had within the window out of the sum at once, though the
  model still receives them, and the replicas left show that only as their windows turn over.
A model at 40 req/s on one replica, given a second, reads 60 req/s so summed (20 on the new one, 40
still on the old one's minute) and looks to need a third; simulated (18 models at 90 req/s on 6
H200s, seed 0), an 8B whose replicas went from 3 to 1 read 14.6 -> 1.7 req/s within two seconds. So
a model's rate is its arrivals over the window (each engine's rate times its span; a departed
engine's still within the window, taken as spread evenly over its span) over the span they cover;
the same for the recent rate over its ten seconds. Counts (queued, running, KV) and the busy
fraction are summed as before; a departed engine's busy fraction fades over the window as its
arrivals do.

The live scheduler (services/scheduler/server.py) and the simulated one (prism/simulator/scheduler.py)
build their snapshots' demand through one `DemandMemory` each."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from services.scheduler.policies import ModelDemand

# As the agents' request stats (services/gpu_agent/request_stats.py; a test checks they agree): the
# recent rate's span, and the shortest span a rate is taken over.
RECENT_RATE_S = 10.0
MIN_RATE_SPAN_S = 1.0

EngineKey = tuple[str, str]  # (agent id, model)


@dataclass(frozen=True)
class EngineLoad:
    """One engine's latest load report, as demand, and the span its rates cover (its window, or
    less just after it started)."""

    demand: ModelDemand
    window_s: float

    @property
    def span(self) -> float:
        """What its rate is taken over: its window, at least MIN_RATE_SPAN_S."""
        return max(self.window_s, MIN_RATE_SPAN_S)

    @property
    def arrivals(self) -> float:
        """Its requests within its window."""
        return self.demand.arrival_rate * self.span

    @property
    def recent_arrivals(self) -> float:
        return self.demand.recent_arrival_rate * recent_span(self.window_s)


def recent_span(window_s: float) -> float:
    return max(min(RECENT_RATE_S, window_s), MIN_RATE_SPAN_S)


@dataclass(frozen=True)
class DepartedEngine:
    key: EngineKey
    load: EngineLoad  # its last
    left_at: float  # the first plan that found it gone

    def arrivals_within(self, now: float, window_s: float) -> tuple[float, float]:
        """Its requests still within the last `window_s` and the last RECENT_RATE_S at `now`, its last
        report's spread evenly over the span each covered."""
        age = max(0.0, now - self.left_at)
        return (
            self.load.demand.arrival_rate * max(0.0, min(self.load.span, window_s - age)),
            self.load.demand.recent_arrival_rate * max(0.0, min(recent_span(self.load.window_s), RECENT_RATE_S - age)),
        )

    def covers(self, now: float) -> float:
        """How far back its numbers reach from `now`."""
        return self.load.span + max(0.0, now - self.left_at)


class DemandMemory:
    """Each model's demand from its engines' latest loads and those of engines that have left (the
    module's docstring says why). Call `demand` once per plan with every engine's latest load."""

    def __init__(self) -> None:
        self._last: dict[EngineKey, EngineLoad] = {}
        self._departed: list[DepartedEngine] = []

    def demand(self, now: float, loads: Mapping[EngineKey, EngineLoad]) -> dict[str, ModelDemand]:
        self._note_departures(now, loads)
        # The agents' window: a mature engine's span. Until one has one, the longest span seen.
        window = max(
            [load.window_s for load in loads.values()] + [d.load.window_s for d in self._departed] + [MIN_RATE_SPAN_S]
        )
        self._departed = [d for d in self._departed if now - d.left_at < window]
        by_model: dict[str, list[EngineLoad]] = {}
        for (_, model), load in loads.items():
            by_model.setdefault(model, []).append(load)
        departed_by_model: dict[str, list[DepartedEngine]] = {}
        for departed in self._departed:
            departed_by_model.setdefault(departed.key[1], []).append(departed)
        return {
            model: model_demand(now, window, by_model.get(model, []), departed_by_model.get(model, []))
            for model in by_model.keys() | departed_by_model.keys()
        }

    def _note_departures(self, now: float, loads: Mapping[EngineKey, EngineLoad]) -> None:
        """Engines reported last time and not now have left. One that reports again with a window
        reaching back before it left is the same engine's numbers (its agent's report was late, not
        the engine gone): its own window counts those requests, so its departure is forgotten."""
        self._departed = [
            d for d in self._departed if not (d.key in loads and loads[d.key].window_s >= now - d.left_at)
        ]
        for key in self._last.keys() - loads.keys():
            self._departed.append(DepartedEngine(key, self._last[key], now))
        self._last = dict(loads)


def model_demand(now: float, window_s: float, loads: list[EngineLoad], departed: list[DepartedEngine]) -> ModelDemand:
    """One model's demand: its engines' loads summed, its rates its arrivals over the span they cover
    (departed engines' arrivals within the window included)."""
    total = ModelDemand()
    for load in loads:
        total = total + load.demand
    arrivals = sum(load.arrivals for load in loads)
    recent_arrivals = sum(load.recent_arrivals for load in loads)
    span = max([load.span for load in loads] + [MIN_RATE_SPAN_S])
    busy = total.busy_fraction
    for engine in departed:
        within, recent_within = engine.arrivals_within(now, window_s)
        arrivals += within
        recent_arrivals += recent_within
        span = max(span, engine.covers(now))
        busy += engine.load.demand.busy_fraction * max(0.0, 1 - (now - engine.left_at) / window_s)
    span = min(span, window_s)
    if not loads:  # its token means, from the departed engines' last reports
        for engine in departed:
            total = total + replace(engine.load.demand, queued=0, running=0, kv_demand_bytes=0)
    return replace(
        total, arrival_rate=arrivals / span, recent_arrival_rate=recent_arrivals / recent_span(span), busy_fraction=busy
    )
