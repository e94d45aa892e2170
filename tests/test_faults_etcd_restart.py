"""An etcd restart (issue 8, item 6b), on a real cluster: etcd, the
scheduler (`prism` policy), two agents and the gateway as processes, the two
tiny models. Clients keep requests going through both APIs while etcd is
stopped for a few seconds and started again on its data: during the outage
the gateway serves from its cached view of the placements (or fails a
request explicitly, never hanging or cutting it); afterwards the scheduler
leads again, the agents' registrations and engine records are back under
new leases and every request completes; and a placement change made after
the restart (the agent serving the models killed, so the scheduler places
them on the other) is seen by everyone: the survivor loads them, the
gateway routes to it, and requests complete there."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest

from bench.load_soak import COMPLETE, LOST, BackgroundLoad, Planned
from services.common import records
from services.common.etcd import connect
from tests.prism_clusters import prism_cluster as start_prism_cluster
from tests.prism_clusters import until
from tests.test_agent_failover_cluster import models_on

GUARD_S = 90  # a request, a recovery or a re-placement not done by then has hung
OUTAGE_S = 3.0
EXPLICIT = {"error sse model_unavailable", "error http 503", "error grpc UNAVAILABLE"}


@pytest.fixture(scope="module")
def two_agents(tmp_path_factory):
    with start_prism_cluster(tmp_path_factory.mktemp("etcd-restart"), agents=2) as cluster:
        yield cluster


def etcd_view(cluster) -> tuple[str | None, set[str], set[str]]:
    """(the scheduler leader, the agents registered, the engine keys), read from etcd."""

    async def read():
        client = await connect(cluster.etcd_endpoint, timeout_s=5)
        try:
            leader = await client.get(records.SCHEDULER_LEADER.encode())
            agents = {kv.key.decode()[len(records.AGENTS) :] for kv in await client.get_prefix(records.AGENTS.encode())}
            engines = {kv.key.decode() for kv in await client.get_prefix(records.ENGINES.encode())}
            return (records.LeaderRecord.from_json(leader.value).scheduler_id if leader else None), agents, engines
        finally:
            await client.close()

    return asyncio.run(read())


def test_an_etcd_restart_keeps_serving_and_a_later_placement_change_is_seen(two_agents):
    cluster = two_agents
    where = until(
        lambda: (
            (w := {n: models_on(a) for n, a in cluster.agent_addresses.items()})
            and sum(map(len, w.values())) == 2
            and w
        ),
        "both models placed",
        GUARD_S,
    )
    models = sorted(set().union(*where.values()))
    # Both models can be served by one agent before the other has registered (a loaded machine): wait for both.
    _, agents_before, engines_before = until(
        lambda: (view := etcd_view(cluster)) and len(view[1]) == 2 and len(view[2]) == 2 and view,
        "both agents and both engines in etcd",
        GUARD_S,
    )

    def request(index: int) -> Planned:
        api, stream = [("rest", True), ("grpc", True), ("rest", False)][index % 3]
        return Planned(
            index=index,
            api=api,
            model=models[index // 3 % 2],
            prompt=f"Request {index}",
            max_tokens=16,
            stream=stream,
            chat=False,
            cancel_after=0,
        )

    with BackgroundLoad(cluster.http_url, cluster.gateway_grpc, request, workers=6, deadline_s=GUARD_S) as load:
        load.wait_for(lambda done: sum(o.kind == COMPLETE for o in done) >= 12, "requests before", GUARD_S)
        cluster.etcd.stop()
        stopped = time.monotonic()
        load.wait_for(
            lambda done: time.monotonic() - stopped >= OUTAGE_S and sum(o.started >= stopped for o in done) >= 12,
            "requests during the outage",
            GUARD_S,
        )
        cluster.etcd.start()
        restarted = time.monotonic()
        # etcd answers with a leader, both agents and both engines (the kill below shows they are live).
        until(
            lambda: (
                (view := etcd_view(cluster))[0] is not None and view[1] == agents_before and view[2] == engines_before
            ),
            "the leader, agents and engines in etcd",
            GUARD_S,
        )
        recovered = time.monotonic()
        load.wait_for(
            lambda done: sum(o.kind == COMPLETE and o.started > recovered for o in done) >= 12,
            "requests after the restart",
            GUARD_S,
        )
        # A placement change after the restart: the agent serving the models dies; they move to the other.
        # This needs the scheduler to lead again and to see the agent's key go (its watch), the survivor's
        # registration to outlive its old lease (renewed under a new one), and the gateway to see the new
        # placement and engines (its watch).
        victim = next(name for name, placed in where.items() if placed)
        survivor = next(name for name in where if name != victim)
        killed = time.monotonic()
        cluster.kill(victim)
        until(
            lambda: set(models) <= models_on(cluster.agent_addresses[survivor]),
            f"{models} placed on {survivor}",
            GUARD_S,
        )
        replaced = time.monotonic()
        load.wait_for(
            lambda done: sum(o.kind == COMPLETE and o.started > replaced for o in done) >= 12,
            "requests after the re-placement",
            GUARD_S,
        )
    outcomes = load.outcomes

    def ends(chosen) -> dict[str, int]:
        return dict(Counter(o.label for o in outcomes if chosen(o)))

    outage = ends(lambda o: stopped <= o.started < restarted)
    coming_back = ends(lambda o: restarted <= o.started < recovered)
    after = ends(lambda o: recovered <= o.started and o.ended < killed)
    around_kill = ends(lambda o: recovered <= o.started < replaced and o.ended >= killed)
    replaced_after = ends(lambda o: o.started >= replaced)
    print(
        f"\netcd down {restarted - stopped:.1f}s; its leader, agents and engines read back "
        f"{recovered - restarted:.1f}s "
        f"after its start; {models} placed on {survivor} {replaced - killed:.1f}s after kill -9 of {victim}\n"
        f"during the outage: {outage}; until etcd answered: {coming_back}; after: {after}; "
        f"in flight at the kill or sent before the re-placement: {around_kill}; after the re-placement: "
        f"{replaced_after}; slowest request during the outage "
        f"{max((o.latency_s for o in outcomes if stopped <= o.started < restarted), default=0):.2f}s"
    )
    assert not [o for o in outcomes if o.kind == LOST], [f"{o.shape}: {o.detail}" for o in outcomes if o.kind == LOST]
    # During the outage: served from the gateway's cached routing (or failed explicitly).
    assert outage.get("complete") and set(outage) | set(coming_back) <= EXPLICIT | {"complete"}, (outage, coming_back)
    # After it, everything completes; around the kill, explicit errors; after the re-placement, all complete.
    assert set(after) == {"complete"}, after
    assert set(around_kill) <= EXPLICIT | {"complete"}, around_kill
    assert set(replaced_after) == {"complete"}, replaced_after
