"""Cold start: a request for a model of the registry that no live agent can
serve yet (never placed, unplaced by its policy, its agent gone while the
scheduler places it again, its engine still loading) waits for an engine
instead of failing at once.

It waits at most the model's TTFT SLO plus an activation allowance (the
gateway's --cold-start-timeout-s), woken by the router on every change of the
placement state in etcd (no polling), then goes on to the agent like any
request; its TTFT, measured from its arrival, includes the wait. Past the
bound it fails with 503. A client that leaves cancels its wait. Unknown
models still fail at once with 404.

While requests wait, the gateway tells the scheduler: DemandPublisher keeps
demand/<model>/<gateway_id> (records.DemandRecord: how many wait, since when)
in etcd under a short lease, and deletes it once none waits; the scheduler
counts them as queued demand and re-plans at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

from services.common import records
from services.common.etcd import LeasedKeys
from services.gateway.errors import ModelUnavailable
from services.gateway.metrics import GatewayMetrics
from services.gateway.router import GatewayNotReady, Router

log = logging.getLogger(__name__)

DEFAULT_ALLOWANCE_S = 30.0  # loading a model from disk takes seconds; bigger ones more
DEMAND_TTL_S = 5  # a gateway that dies leaves its demand keys this long at most


class ColdStartTimeout(ModelUnavailable):
    pass


class DemandPublisher:
    """The requests of this gateway waiting per model, mirrored into etcd.

    add()/remove() only change local counts and wake run(), which writes the
    latest state, so a burst of arrivals costs a few etcd writes, not one each."""

    def __init__(self, router: Router, gateway_id: str, ttl_s: int = DEMAND_TTL_S):
        self.router = router
        self.gateway_id = gateway_id
        self.ttl_s = ttl_s
        self._waiting: dict[str, dict[int, float]] = {}  # model -> token -> arrival (wall clock)
        self._tokens = itertools.count()
        self._dirty = asyncio.Event()

    def add(self, model: str) -> int:
        token = next(self._tokens)
        self._waiting.setdefault(model, {})[token] = time.time()
        self._dirty.set()
        return token

    def remove(self, model: str, token: int) -> None:
        waiting = self._waiting.get(model, {})
        waiting.pop(token, None)
        if not waiting:
            self._waiting.pop(model, None)
        self._dirty.set()

    def waiting(self, model: str) -> int:
        return len(self._waiting.get(model, ()))

    def _records(self) -> dict[str, bytes]:
        return {
            records.demand_key(model, self.gateway_id): records.DemandRecord(
                model=model, gateway_id=self.gateway_id, waiting=len(arrivals), since=min(arrivals.values())
            ).to_json()
            for model, arrivals in self._waiting.items()
        }

    async def run(self) -> None:
        await self.router.wait_ready()
        keys = LeasedKeys(self.router.etcd, self.ttl_s)
        keepalive = asyncio.create_task(keys.run(), name="demand-lease")
        published: dict[str, bytes] = {}
        try:
            while True:
                await self._dirty.wait()
                self._dirty.clear()
                wanted = self._records()
                try:
                    for key in published.keys() - wanted.keys():
                        await keys.delete(key)
                        del published[key]
                    for key, value in wanted.items():
                        if published.get(key) != value:
                            await keys.put(key, value)
                            published[key] = value
                except Exception as exc:  # etcd away: keep the requests waiting, write again shortly
                    log.warning("could not publish cold-start demand (%s); retrying", exc)
                    self._dirty.set()
                    await asyncio.sleep(0.5)
        finally:
            keepalive.cancel()
            if published:
                try:
                    await keys.revoke()  # a clean shutdown leaves no demand behind
                except Exception as exc:
                    log.warning("could not revoke the demand lease: %s", exc)


class ColdStart:
    """Finds the agents for a request's model, waiting for one where needed."""

    def __init__(
        self,
        router: Router,
        metrics: GatewayMetrics,
        allowance_s: float = DEFAULT_ALLOWANCE_S,
        demand: DemandPublisher | None = None,
    ):
        self.router = router
        self.metrics = metrics
        self.allowance_s = allowance_s
        self.demand = demand

    async def candidates(self, model: str, prefix_key: str | None = None) -> list[str]:
        """Router.candidates, but a model with no live replica is waited for
        (up to its TTFT SLO plus the allowance; an allowance of 0 turns waiting off)."""
        try:
            return self.router.candidates(model, prefix_key)
        except GatewayNotReady:
            raise
        except ModelUnavailable as exc:
            if self.allowance_s <= 0:
                raise
            first = exc
        ttft_s = self.router.ttft_slo_s(model)
        bound_s = ttft_s + self.allowance_s
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + bound_s
        log.info("%s; waiting up to %.1fs for it", first.message, bound_s)
        token = self.demand.add(model) if self.demand else None
        waiting = self.metrics.cold_start_waiting.labels(model)
        waiting.inc()
        outcome: str | None = "cancelled"  # unless it ends otherwise: the caller was cancelled (its client left)
        last = first
        try:
            while True:
                changed = self.router.next_change()
                try:
                    found = self.router.candidates(model, prefix_key)
                except ModelUnavailable as exc:
                    last = exc
                else:
                    outcome = "served"
                    log.info("model %s became servable after %.2fs", model, loop.time() - start)
                    return found
                remaining = deadline - loop.time()
                if remaining <= 0:
                    outcome = "timeout"
                    raise ColdStartTimeout(
                        f"model {model!r} did not become available within {bound_s:g}s (its TTFT SLO of "
                        f"{ttft_s:g}s plus {self.allowance_s:g}s to load and activate it): {last.message}"
                    )
                try:
                    await asyncio.wait_for(changed.wait(), remaining)
                except TimeoutError:
                    pass
        except Exception:
            if outcome == "cancelled":  # the model left the registry, or the gateway lost etcd
                outcome = None
            raise
        finally:
            waiting.dec()
            if self.demand is not None and token is not None:
                self.demand.remove(model, token)
            if outcome is not None:
                self.metrics.cold_start_wait.labels(model, outcome).observe(loop.time() - start)
