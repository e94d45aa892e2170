"""One model's recent requests on this agent: arrival rate, TTFT and TPOT
percentiles, SLO attainment, shed and failed counts, the busy fraction (the
part of the window with at least one request in flight) and the mean prompt
and output tokens of finished requests, over a sliding window.

The agent records every request's arrival and end here; the load reporter,
GetStatus (and so the gateway's /metrics and `prism top`) read snapshots.
Events are kept with their time in deques and dropped once older than the
window, on every call, so memory follows the request rate times the window;
a cap on each deque bounds it even under a flood (then the window shrinks to
what the newest `max_events` events cover, and the rate is computed over that
span, so it stays right).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from services.gpu_agent.slo import ModelSlo

DEFAULT_WINDOW_S = 60.0
DEFAULT_MAX_EVENTS = 100_000  # per kind of event: about 1,700 requests/s over a minute
# Arrival rates in the first moments of a window would be wild (one request
# after 1 ms is not 1,000/s): the rate's span is never shorter than this.
MIN_RATE_SPAN_S = 1.0
# The recent arrival rate's span: short, so that a burst shows within seconds.
RECENT_RATE_S = 10.0


@dataclass(frozen=True)
class ServingSnapshot:
    """Mirrors the ServingStats proto (services/gpu_agent/status_report.py converts)."""

    window_s: float  # the span the numbers cover: the window, or less just after start
    arrival_rate: float  # requests/s
    finished_requests: int
    ttft_p50_ms: float  # 0 when none finished
    ttft_p99_ms: float
    tpot_p50_ms: float  # 0 when no finished request had a second token
    tpot_p99_ms: float
    slo_attainment: float  # fraction of finished requests within both SLOs; 1.0 when none finished
    shed_requests: int
    failed_requests: int
    # Fraction of the window in which at least one request was in flight here
    # (from its arrival to its end, waiting for admission included).
    busy_fraction: float = 0.0
    mean_prompt_tokens: float = 0.0  # over the finished requests that reported tokens; 0 when none did
    mean_output_tokens: float = 0.0
    recent_arrival_rate: float = 0.0  # requests/s over the last RECENT_RATE_S (less just after start)


@dataclass(frozen=True)
class _Finished:
    at: float
    ttft_s: float
    tpot_s: float | None
    met: bool
    prompt_tokens: int = 0
    output_tokens: int = 0


class BusyTime:
    """When at least one request is in flight, over a sliding window: the
    busy intervals that ended (pruned once wholly older than the window) and
    the one still open. Not thread-safe (callers hold their lock)."""

    def __init__(self, max_intervals: int = DEFAULT_MAX_EVENTS):
        self.in_flight = 0
        self._since: float | None = None  # start of the open busy interval
        self._intervals: deque[tuple[float, float]] = deque(maxlen=max_intervals)

    def began(self, now: float) -> None:
        if self.in_flight == 0:
            self._since = now
        self.in_flight += 1

    def ended(self, now: float) -> None:
        if self.in_flight == 0:
            return  # an end without a beginning: nothing was counted in flight
        self.in_flight -= 1
        if self.in_flight == 0 and self._since is not None:
            self._intervals.append((self._since, now))
            self._since = None

    def prune(self, cutoff: float) -> None:
        while self._intervals and self._intervals[0][1] < cutoff:
            self._intervals.popleft()

    def seconds(self, start: float, now: float) -> float:
        """Busy seconds within [start, now]."""
        total = sum(max(0.0, min(end, now) - max(begin, start)) for begin, end in self._intervals)
        if self._since is not None:
            total += max(0.0, now - max(self._since, start))
        return total

    def fraction(self, start: float, now: float) -> float:
        return min(1.0, self.seconds(start, now) / (now - start)) if now > start else 0.0


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in (0, 1]) of an ascending list; 0.0 when empty.
    Nearest rank reports a value that was actually observed, and p99 of a
    handful of requests is their slowest, which is what an SLO cares about."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class ModelRequestStats:
    def __init__(
        self,
        slo: ModelSlo,
        window_s: float = DEFAULT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        max_events: int = DEFAULT_MAX_EVENTS,
        started_at: float | None = None,
    ):
        """started_at: when the numbers began (default: now), on `clock`; rates are over the
        time since then until it reaches the window (the simulator backdates it for engines
        that were up before its trace began, as a live cluster's are)."""
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.slo = slo
        self.window_s = window_s
        self._clock = clock
        self._started = clock() if started_at is None else started_at
        self._arrivals: deque[float] = deque(maxlen=max_events)
        self._finished: deque[_Finished] = deque(maxlen=max_events)
        self._shed: deque[float] = deque(maxlen=max_events)
        self._failed: deque[float] = deque(maxlen=max_events)
        self._busy = BusyTime(max_events)
        # Requests end on the event loop, but an engine thread or a test may
        # record too; a snapshot must not see a deque mid-prune.
        self._lock = threading.Lock()

    # ---- recording ---------------------------------------------------------

    def arrived(self) -> None:
        """A request arrived; it is in flight until `ended()` (call that once for each arrival, however the
        request ends: finished, shed, failed or cancelled)."""
        with self._lock:
            now = self._clock()
            self._arrivals.append(now)
            self.last_arrival = now
            self._busy.began(now)
            self._prune(now)

    def ended(self) -> None:
        """A request that arrived is no longer in flight."""
        with self._lock:
            self._busy.ended(self._clock())

    @property
    def in_flight(self) -> int:
        return self._busy.in_flight

    def idle_s(self) -> float:
        """Seconds since the last arrival (infinite before the first)."""
        last = getattr(self, "last_arrival", None)
        return float("inf") if last is None else self._clock() - last

    def finished(self, ttft_s: float, tpot_s: float | None, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        """A request ended normally; tpot_s is None when it produced one token only; its token counts
        (0: not known) feed the mean tokens per request."""
        with self._lock:
            now = self._clock()
            self._finished.append(
                _Finished(now, ttft_s, tpot_s, self.slo.met(ttft_s, tpot_s), prompt_tokens, output_tokens)
            )
            self._prune(now)

    def shed(self) -> None:
        """A request was refused (the model sheds load it cannot serve in time)."""
        with self._lock:
            now = self._clock()
            self._shed.append(now)
            self._prune(now)

    def failed(self) -> None:
        """A request ended with an error."""
        with self._lock:
            now = self._clock()
            self._failed.append(now)
            self._prune(now)

    # ---- reading -----------------------------------------------------------

    def snapshot(self) -> ServingSnapshot:
        with self._lock:
            now = self._clock()
            self._prune(now)
            span = min(self.window_s, now - self._started)
            rate_span = max(span, MIN_RATE_SPAN_S)
            arrivals = len(self._arrivals)
            if arrivals == self._arrivals.maxlen and now > self._arrivals[0]:
                # Capped: the retained arrivals cover less than the window; a
                # flood is what fills the cap, so their own span is no start-up blip.
                span = rate_span = min(span, now - self._arrivals[0])
            finished = list(self._finished)
            shed, failed = len(self._shed), len(self._failed)
            busy = self._busy.fraction(now - span, now)
            recent_span = max(min(RECENT_RATE_S, span), MIN_RATE_SPAN_S)
            recent = 0
            for at in reversed(self._arrivals):  # newest first: only the recent ones are read
                if at < now - recent_span:
                    break
                recent += 1
        counted = [f for f in finished if f.prompt_tokens or f.output_tokens]
        ttfts = sorted(f.ttft_s for f in finished)
        tpots = sorted(f.tpot_s for f in finished if f.tpot_s is not None)
        return ServingSnapshot(
            window_s=span,
            arrival_rate=arrivals / rate_span,
            recent_arrival_rate=recent / recent_span,
            finished_requests=len(finished),
            ttft_p50_ms=percentile(ttfts, 0.50) * 1000,
            ttft_p99_ms=percentile(ttfts, 0.99) * 1000,
            tpot_p50_ms=percentile(tpots, 0.50) * 1000,
            tpot_p99_ms=percentile(tpots, 0.99) * 1000,
            slo_attainment=sum(f.met for f in finished) / len(finished) if finished else 1.0,
            shed_requests=shed,
            failed_requests=failed,
            busy_fraction=busy,
            mean_prompt_tokens=sum(f.prompt_tokens for f in counted) / len(counted) if counted else 0.0,
            mean_output_tokens=sum(f.output_tokens for f in counted) / len(counted) if counted else 0.0,
        )

    def _prune(self, now: float) -> None:
        # The window is [now - window_s, now]: an event exactly window_s old still counts.
        cutoff = now - self.window_s
        for times in (self._arrivals, self._shed, self._failed):
            while times and times[0] < cutoff:
                times.popleft()
        while self._finished and self._finished[0].at < cutoff:
            self._finished.popleft()
        self._busy.prune(cutoff)
