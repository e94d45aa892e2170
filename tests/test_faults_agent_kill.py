"""kill -9 of an agent while it streams (issue 8, item 6a), on a real
cluster: etcd, the scheduler (`prism` policy), two agents and the gateway as
processes, the two tiny models. Clients keep requests going through both
APIs (SSE and gRPC streams, non-streamed completions) while the agent that
serves them is killed: every request in flight on it ends with an explicit
error (an SSE error event then [DONE], a 503, gRPC UNAVAILABLE with the
gateway's trailers), never a hang or a cut stream; the requests sent while
its models have no live replica end explicitly too (or wait and are served
once the models are placed again); and once the scheduler has placed them
on the other agent every new request completes there.
tests/test_agent_failover_cluster.py proves the re-placement itself.

A frozen agent (SIGSTOP: a hung host, a network partition) keeps its
connections open and answers nothing; the gateway's keepalive pings
(--agent-keepalive-s, 2 s here) find it, and the requests in flight on it
end with an explicit error instead of waiting out the gateway's request
timeout (600 s): before the keepalive, every one of them hung.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import pytest

from bench.load_soak import (
    COMPLETE,
    ERROR,
    LOST,
    BackgroundLoad,
    Planned,
    agent_accounting,
)
from tests.prism_clusters import prism_cluster as start_prism_cluster
from tests.test_agent_failover_cluster import models_on

GUARD_S = 90  # a request or a re-placement not done by then has hung
KEEPALIVE_S = 2.0
EXPLICIT = {"error sse model_unavailable", "error http 503", "error grpc UNAVAILABLE"}


@pytest.fixture(scope="module")
def two_agents(tmp_path_factory):
    with start_prism_cluster(
        tmp_path_factory.mktemp("kill-agent"), agents=2, gateway_args=("--agent-keepalive-s", str(KEEPALIVE_S))
    ) as cluster:
        yield cluster


def placed(cluster) -> dict[str, set[str]]:
    deadline = time.monotonic() + GUARD_S
    while True:
        where = {name: models_on(address) for name, address in cluster.agent_addresses.items()}
        if sum(len(m) for m in where.values()) == 2:
            return where
        assert time.monotonic() < deadline, f"models not placed: {where}"
        time.sleep(0.2)


def fail_the_serving_agent_under_load(cluster, fail) -> tuple[str, str, list[str], list, float, float]:
    """Clients keep requests going to the models of the agent serving tiny-llama; once it runs some,
    fail(name) fails it, and the load goes on until its models are placed on the other agent and served
    there. Returns (victim, survivor, its models, every Outcome, when it was failed, when re-placed)."""
    for name in cluster.agent_addresses:  # both agents up (an earlier test killed one)
        if cluster.processes[name].poll() is not None:
            cluster.restart_agent(name)
    where = placed(cluster)
    victim = next(name for name, models in where.items() if "tiny-llama" in models)
    survivor = next(name for name in where if name != victim)
    moving = sorted(where[victim])

    def request(index: int) -> Planned:
        api, stream = [("rest", True), ("grpc", True), ("rest", False)][index % 3]
        return Planned(
            index=index,
            api=api,
            model=moving[index // 3 % len(moving)],
            prompt=f"Stream {index}",
            max_tokens=96,
            stream=stream,
            chat=False,
            cancel_after=0,
        )

    with BackgroundLoad(cluster.http_url, cluster.gateway_grpc, request, workers=8, deadline_s=GUARD_S) as load:
        load.wait_for(lambda done: sum(o.kind == COMPLETE for o in done) >= 16, "requests before the kill", GUARD_S)
        deadline = time.monotonic() + GUARD_S
        while not any(
            n["running_requests"] for n in agent_accounting({victim: cluster.agent_addresses[victim]})[victim].values()
        ):
            assert time.monotonic() < deadline, "no request running on the agent to kill"
        killed = time.monotonic()
        fail(victim)
        while not set(moving) <= models_on(cluster.agent_addresses[survivor]):
            assert time.monotonic() < killed + GUARD_S, f"{moving} not placed again on {survivor}"
            time.sleep(0.1)
        replaced = time.monotonic()
        load.wait_for(
            lambda done: sum(o.kind == COMPLETE and o.started > replaced for o in done) >= 16,
            "requests after the re-placement",
            GUARD_S,
        )
    return victim, survivor, moving, load.outcomes, killed, replaced


def test_killing_an_agent_mid_stream_ends_its_requests_explicitly_and_new_ones_go_to_the_other(two_agents):
    cluster = two_agents
    victim, survivor, moving, outcomes, killed, replaced = fail_the_serving_agent_under_load(
        cluster, cluster.kill
    )  # SIGKILL: no drain, no lease revoked
    in_flight = [o for o in outcomes if o.started < killed < o.ended]
    outage = [o for o in outcomes if killed <= o.started < replaced]
    after = [o for o in outcomes if o.started >= replaced]
    print(
        f"\n{moving} placed again on {survivor} {replaced - killed:.1f}s after kill -9 of {victim}; "
        f"in flight at the kill: {dict(Counter(o.label for o in in_flight))}; sent meanwhile: "
        f"{dict(Counter(o.label for o in outage))}; after: {dict(Counter(o.label for o in after))}"
    )
    assert not [o for o in outcomes if o.kind == LOST], [f"{o.shape}: {o.detail}" for o in outcomes if o.kind == LOST]
    # In flight on the killed agent: ended explicitly (or finished just before it died).
    assert any(o.kind == ERROR for o in in_flight), "no request was in flight on the killed agent"
    assert {o.label for o in in_flight} <= EXPLICIT | {"complete"}, dict(Counter(o.label for o in in_flight))
    # Meanwhile: explicit errors, or served once the models were placed again.
    assert {o.label for o in outage} <= EXPLICIT | {"complete"}, dict(Counter(o.label for o in outage))
    # Once placed on the other agent: every request completes.
    assert after and {o.label for o in after} == {"complete"}, dict(Counter(o.label for o in after))


def test_a_frozen_agents_requests_end_with_an_explicit_error_not_a_hang(two_agents):
    cluster = two_agents
    frozen: list[str] = []

    def freeze(name: str) -> None:
        os.kill(cluster.processes[name].pid, signal.SIGSTOP)  # alive, connections open, answering nothing
        frozen.append(name)

    try:
        victim, survivor, moving, outcomes, stopped, replaced = fail_the_serving_agent_under_load(cluster, freeze)
    finally:
        for name in frozen:
            cluster.kill(name)
    in_flight = [o for o in outcomes if o.started < stopped < o.ended]
    print(
        f"\n{moving} placed again on {survivor} {replaced - stopped:.1f}s after {victim} was stopped (SIGSTOP); "
        f"in flight on it: {dict(Counter(o.label for o in in_flight))}, the last ending "
        f"{max((o.ended for o in in_flight), default=stopped) - stopped:.1f}s after the stop; "
        f"after the re-placement: {dict(Counter(o.label for o in outcomes if o.started >= replaced))}"
    )
    assert not [o for o in outcomes if o.kind == LOST], [f"{o.shape}: {o.detail}" for o in outcomes if o.kind == LOST]
    assert any(o.kind == ERROR for o in in_flight), "no request was in flight on the frozen agent"
    assert {o.label for o in outcomes if o.started < replaced} <= EXPLICIT | {"complete"}
    after = [o for o in outcomes if o.started >= replaced]
    assert after and {o.label for o in after} == {"complete"}, dict(Counter(o.label for o in after))
