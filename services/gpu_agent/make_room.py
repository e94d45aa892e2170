"""Which engines to switch off so that another's weights fit on a device.

An engine switched on for a request (or by the scheduler) needs room for its
weights beside the active engines' weights and the device's reserve, and for
one page bundle of KV for each of them (the least KV limit the memory policy
gives: an engine given none would serve nothing while the others are busy).
Callers count that floor in `weight_bytes` and `need_bytes`. When the
scheduler's plan and the requests disagree for a moment (a burst for a model
the plan switched off, on a device full of others), failing the request is
the worst answer: engines with nothing to serve can step aside instead, and
come back in about as long as this one takes to activate.

A pure function, so the agent (memory_coordinator.py) and the simulator
(prism/simulator/cluster.py) make the same choice: engines with no request
running or waiting, the longest idle first, until the weights fit.
`min_idle_s` spares engines whose last request is more recent than that;
the agent and the simulator pass the agent's busy window (10 s), as its
non-forced deactivations do. Sparing none thrashed a crowded GPU: simulated,
200 models under the static policy on 8 GPUs over 150 s attained 5.0%
without making room and 1.8% making room from any idle engine (engines of
25 models per GPU switching each other off and on), though over 20 s it was
6.9% and 8.8% (8.2% sparing the last 10 s).

An activation never takes the KV that the engines staying on hold for their
running requests (kv_kept_bytes): their limits would shrink under those
requests and preempt them, so a request for a model with a trickle of
traffic would cost a busy neighbour dozens of requests. Refused, the
trickle's request fails at once (RESOURCE_EXHAUSTED); the busy engine's
requests keep their KV.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.common.request_sizes import DEFAULT_OUTPUT_TOKENS, DEFAULT_PROMPT_TOKENS


@dataclass(frozen=True)
class ResidentEngine:
    """An active engine on the device, as the choice sees it."""

    model: str
    weight_bytes: int
    idle_s: float  # since its last request arrived; infinite if none ever did
    serving: bool  # a request is running in it or waiting for it
    recent_rate: float = 0.0  # its requests a second over the agent's recent window (10 s)
    waiting: bool = False  # a request waits for admission or in the engine's queue
    in_flight: int = 0  # its requests running or waiting
    priority: int = 0  # the model's (placement config): higher is served first


# An engine staying on through another's activation keeps KV for its arrivals over this long too: about
# the time an activation takes (a copy of up to a second for an 8B on an H100, more when several share
# the link), during which its requests keep coming and the balloon can give them only what the newcomer
# left. Simulated (bench/one_gpu.py's 12 models on an H100, 60 s points): on seed 3 at 14 req/s a
# one-request 8B switched on beside a 3B with 146 running preempted 53 of them. Over seeds 0-7 at 14/17
# req/s: prism 91.1/83.7% within SLO -> 94.3/85.1%, time-share 93.1/84.1 -> 94.3/86.0, kvpr 91.6/83.7 ->
# 93.2/88.6; at 8 and 11 req/s within 0.6 points. On seeds 4-7, which the choice of one second did not
# see (it was made on 0-3 among 1, 2 and 5 s: 2 s lost time-share 2.7 points at 17 req/s on 4-7, 5 s lost
# 1.1 at 8 req/s on 0-3): prism +1.5/-0.5, time-share +1.8/+0.8, kvpr +1.2/+5.9 at 14/17 req/s.
ARRIVALS_KEPT_S = 1.0
# Tokens a request brings when the engine has finished none yet (the policies' defaults too).
DEFAULT_REQUEST_TOKENS = DEFAULT_PROMPT_TOKENS + DEFAULT_OUTPUT_TOKENS


def arriving_tokens(
    recent_rate: float, mean_prompt_tokens: float, mean_output_tokens: float, horizon_s: float = ARRIVALS_KEPT_S
) -> int:
    """The KV tokens an engine's requests arriving over horizon_s will take, at its recent rate and its
    requests' mean sizes (DEFAULT_REQUEST_TOKENS before any finished)."""
    per_request = (mean_prompt_tokens + mean_output_tokens) or DEFAULT_REQUEST_TOKENS
    return int(recent_rate * horizon_s * per_request)


def kv_kept_bytes(floor_bytes: int, used_bytes: int, demand_bytes: int = 0, arriving_bytes: int = 0) -> int:
    """The KV an engine staying on keeps through another's activation: what
    its requests hold now or what its running and queued requests need soon
    (its demand), whichever is more, and beyond it what its arrivals over
    ARRIVALS_KEPT_S will need (arriving_tokens); at least its floor (one page bundle). Counting the floor
    alone let activations take KV in use: simulated, bench/one_gpu.py's 12
    models on an H100 under time-share (seeds 0-2, 6/10/14 req/s, a 20 GiB
    reserve), 82.8% of requests within SLO on average against 91.2% counting
    what is in use; at 14 req/s, seed 0, 60.5% against 95.5% (770 and 42
    preemptions), the 8B that served most of the requests losing its KV to
    models of a 2% share of the traffic. Counting what is held but not the
    demand let a request for a low-rate 8B switch it on beside three busy
    engines with the memory the busiest one's queue waited for (simulated
    with kvcached's page placement and a 22 GiB reserve, prism at 20 req/s,
    seed 1: 59.5% within SLO, 80.8% counting the demand)."""
    return max(floor_bytes, max(used_bytes, demand_bytes) + arriving_bytes)


def engines_to_switch_off(
    residents: Sequence[ResidentEngine], need_bytes: int, free_bytes: int, min_idle_s: float = 0.0
) -> list[str] | None:
    """The engines to switch off, in order, so that `need_bytes` of weights
    fit where `free_bytes` are free now: [] when they fit already, None when
    even every engine with nothing to serve for `min_idle_s` would not make
    room (then none is switched off for nothing)."""
    if need_bytes <= free_bytes:
        return []
    chosen: list[str] = []
    idle = (e for e in residents if not e.serving and e.idle_s >= min_idle_s)
    for engine in sorted(idle, key=lambda e: (-e.idle_s, e.model)):
        chosen.append(engine.model)
        free_bytes += engine.weight_bytes
        if need_bytes <= free_bytes:
            return chosen
    return None


def engines_to_relieve(residents: Sequence[ResidentEngine], shortfall_bytes: int, min_idle_s: float) -> list[str]:
    """The engines to switch off so that their weights give the device's KV
    budget `shortfall_bytes` more: those with nothing to serve for
    `min_idle_s`, longest idle first, until their weights cover it (all of
    them when they fall short: each one helps). The balloon's other half:
    an idle engine's weights are the largest memory on a crowded GPU, and
    with KV limits alone the requests of the engines that serve can wait
    for KV that no limit can give while idle neighbours hold gigabytes."""
    chosen: list[str] = []
    freed = 0
    for engine in sorted(
        (e for e in residents if not e.serving and e.idle_s >= min_idle_s), key=lambda e: (-e.idle_s, e.model)
    ):
        if freed >= shortfall_bytes:
            break
        chosen.append(engine.model)
        freed += engine.weight_bytes
    return chosen


# Under KV pressure with no idle engine to switch off, an engine whose requests arrive slower than this, and
# YIELD_RATIO times slower than the busiest engine's on its device, is switched off, its few requests
# failing (engine_to_yield). Chosen before measuring (a trickle, an order of magnitude below a burst), not
# tuned: simulated, bench/one_gpu.py's 12 models on an H100 (30 s points), at 17/20/23 req/s over seeds 4-7,
# which no choice here saw: prism 93.8/88.1/77.0% within SLO -> 96.7/93.6/79.6%, time-share 95.3/90.6/77.0
# -> 97.0/92.9/79.6, kvpr 94.0/92.9/78.2 -> 97.7/95.5/83.1; at 8-14 req/s within +0.6 but kvpr +1.7 at 11;
# seeds 0-3 (where the 3B burst below was found) +0.4 to +3.7 at 17-23 req/s, the same below
# (bench/results/one_gpu-sim-h100-8seeds-30s.* before, one_gpu-sim-h100-switch-off-trickle.* after).
YIELD_RATE = 1.0
YIELD_RATIO = 10.0
# ... and only while it has at most this many requests to fail: a burst's tail (many requests running, none
# arriving for 10 s) is not a trickle.
YIELD_MAX_IN_FLIGHT = 4


def engine_to_yield(residents: Sequence[ResidentEngine]) -> str | None:
    """The engine to switch off, though it serves, when the device's serving engines need more KV than it has and no
    idle engine can give its memory (engines_to_relieve chose none): the one with the fewest recent requests among
    those below YIELD_RATE and YIELD_RATIO times below the busiest, with nothing waiting, at most
    YIELD_MAX_IN_FLIGHT requests in flight and a priority no higher than the busiest's (the heaviest first among
    equals); None when there is none. A trickle of requests keeps an engine busy (a request every few seconds, each
    running for seconds), so it never goes idle and its weights stay while a burst beside it runs out of KV:
    simulated, bench/one_gpu.py's 12 models at 20 req/s, seed 3, an 8B switched on for 0.9 requests a second beside
    a 3B at 13 a second cost the 3B 103 preemptions and all but 39 of its 331 requests their SLO (166 where the 8B
    had not come on); its requests failing, and later ones refused until the burst leaves room, is the cheaper loss.
    An engine with requests waiting is not a trickle but a burst beginning (two models bursting together on the CPU
    cluster: the first arrivals of one reached the agent before the other's, which read as 0.1 a second beside 4);
    nor is one with many requests running (a burst's tail on a slow CI machine: 40 requests running, none arrived in
    the last 10 s). One with nothing in flight is idle, not a trickle: the idle rule's, after the operator's
    idle time (engines_to_relieve, --relieve-idle-s), which this must not bypass."""
    if not residents:
        return None
    busiest = max(residents, key=lambda r: r.recent_rate)
    low = [
        r
        for r in residents
        if r.recent_rate < YIELD_RATE
        and r.recent_rate * YIELD_RATIO < busiest.recent_rate
        and not r.waiting
        and 0 < r.in_flight <= YIELD_MAX_IN_FLIGHT
        and r.priority <= busiest.priority
    ]
    if not low:
        return None
    return min(low, key=lambda r: (r.recent_rate, -r.weight_bytes, r.model)).model
